// ExpertParallelExperts: each rank of the expert group holds num_experts / ranks experts; tokens go to
// the rank of their expert with a variable-size all-to-all, are computed there and come back the same way.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "pithtrain/distributed.h"
#include "pithtrain/experts.h"
#include "pithtrain/kernels.h"
#include "pithtrain/nn.h"

namespace pithtrain {
namespace {

class ExpertParallelExperts final : public Experts {
 public:
  ExpertParallelExperts(Options& options, const PluginContext& context)
      : dims_(context.dims), group_(context.expert_group), weights_(options, context) {
    ranks_ = group_ ? group_->size() : 1;
    if (dims_.num_experts % ranks_ != 0)
      throw Error("ep_alltoall: num_experts (" + std::to_string(dims_.num_experts) + ") must be divisible by the " +
                  std::to_string(ranks_) + " ranks of the expert group (parallel.expert)");
    local_experts_ = dims_.num_experts / ranks_;
    // Every rank draws the full weights, as `grouped` and `loop` do for the same seed, and keeps its
    // block: a run's initial model is the same whatever the expert-parallel size.
    at::NoGradGuard no_grad;
    const int64_t first = (group_ ? group_->rank() : 0) * local_experts_;
    for (at::Tensor* tensor : {&weights_.gate_proj, &weights_.up_proj, &weights_.down_proj, &weights_.gate_bias,
                               &weights_.up_bias, &weights_.down_bias})
      if (tensor->defined()) *tensor = tensor->narrow(0, first, local_experts_).clone().requires_grad_(true);
  }

  at::Tensor forward(const at::Tensor& hidden, const Routing& routing) override {
    const int64_t slots = routing.expert_ids.size(1);
    // Only the used pairs travel (weight 0 is an unused slot, pithtrain/router.h): P of the T * slots.
    const at::Tensor pairs = at::nonzero(used_slots(routing.weights).reshape(-1)).squeeze(1);  // [P]
    at::Tensor flat_ids = routing.expert_ids.reshape(-1).index_select(0, pairs);         // [P]
    at::Tensor order = std::get<1>(at::sort(flat_ids, /*stable=*/true, 0, false));        // [P]
    at::Tensor source_token = at::floor_divide(pairs.index_select(0, order), slots);       // [P]
    at::Tensor permuted = hidden.index_select(0, source_token);                           // [P, H], by expert
    at::Tensor permuted_weights = routing.weights.reshape(-1).index_select(0, pairs.index_select(0, order));  // [P]
    at::Tensor counts = kernels::count_per_expert(flat_ids, dims_.num_experts).to(at::kCPU);  // [E]

    // received_counts[s * local + e]: rows rank s sends for this rank's local expert e.
    std::vector<int64_t> per_rank(ranks_, local_experts_);
    at::Tensor received_counts = group_ ? group_->all_to_all(counts, per_rank, per_rank) : counts;  // [ranks * local]
    const int64_t* sent = counts.data_ptr<int64_t>();
    const int64_t* got = received_counts.data_ptr<int64_t>();
    std::vector<int64_t> send_rows(ranks_, 0), receive_rows(ranks_, 0);
    for (int64_t r = 0; r < ranks_; ++r)
      for (int64_t e = 0; e < local_experts_; ++e) {
        send_rows[r] += sent[r * local_experts_ + e];
        receive_rows[r] += got[r * local_experts_ + e];
      }
    // Dispatch. The received rows are ordered by source rank, then local expert.
    at::Tensor received = group_ ? group_->all_to_all(permuted, send_rows, receive_rows) : permuted;  // [R, H]

    // Regroup expert-major (each local expert's rows contiguous, sources in rank order).
    std::vector<int64_t> block_start(ranks_ * local_experts_ + 1, 0);
    for (int64_t b = 0; b < ranks_ * local_experts_; ++b) block_start[b + 1] = block_start[b] + got[b];
    std::vector<int64_t> regroup;
    regroup.reserve(block_start.back());
    std::vector<int64_t> rows_per_expert(local_experts_, 0);
    for (int64_t e = 0; e < local_experts_; ++e)
      for (int64_t s = 0; s < ranks_; ++s) {
        const int64_t block = s * local_experts_ + e;
        for (int64_t row = block_start[block]; row < block_start[block + 1]; ++row) regroup.push_back(row);
        rows_per_expert[e] += got[block];
      }
    const auto index_options = at::TensorOptions().dtype(at::kLong).device(hidden.device());
    at::Tensor index = at::tensor(regroup, at::kLong).to(hidden.device());  // [R]
    at::Tensor expert_input = received.index_select(0, index);             // [R, H], expert-major
    // With no rows the (empty) input stands in for the output, so the combine below stays in the graph
    // and this rank takes part in the backward all-to-alls its peers make.
    at::Tensor expert_output = expert_input.size(0) == 0 ? expert_input : weights_.apply_grouped(expert_input, rows_per_expert);  // [R, H]
    at::Tensor inverse = at::empty_like(index).scatter_(0, index, at::arange(index.numel(), index_options));
    at::Tensor back = expert_output.index_select(0, inverse);  // [R, H], by source rank again
    // Combine: each row returns to the rank it came from, in the order it was sent.
    at::Tensor returned = group_ ? group_->all_to_all(back, receive_rows, send_rows) : back;  // [P, H]
    return at::zeros_like(hidden).index_add(0, source_token, returned * permuted_weights.unsqueeze(1));  // [T, H]
  }

  std::vector<Parameter> parameters() override {
    std::vector<Parameter> result = weights_.parameters();
    for (auto& parameter : result) parameter.expert_sharded = group_ != nullptr;
    return result;
  }

 private:
  ModelDims dims_;
  std::shared_ptr<Communicator> group_;  // null: one rank holds every expert
  int64_t ranks_ = 1, local_experts_ = 0;
  ExpertWeights weights_;  // this rank's block: [local_experts, ...]
};

}  // namespace

std::unique_ptr<Experts> make_ep_alltoall_experts(Options& options, const PluginContext& context) {
  return std::make_unique<ExpertParallelExperts>(options, context);
}

}  // namespace pithtrain
