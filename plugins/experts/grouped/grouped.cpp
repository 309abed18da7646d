// GroupedExperts: permute tokens so each expert's are contiguous, run each expert on its slice, combine
// back. The layout a grouped GEMM kernel wants; numerically the same as `loop`.
#include <ATen/ATen.h>

#include <numeric>

#include "pithtrain/experts.h"
#include "pithtrain/kernels.h"
#include "pithtrain/nn.h"

namespace pithtrain {
namespace {

class GroupedExperts final : public Experts {
 public:
  GroupedExperts(Options& options, const PluginContext& context) : dims_(context.dims), weights_(options, context) {}

  at::Tensor forward(const at::Tensor& hidden, const Routing& routing) override {
    // The used (token, slot) pairs sorted by expert, stably, so each expert sees its tokens in the loop's
    // order; the unused ones (weight 0) sorted after them, never computed (pithtrain/router.h).
    at::Tensor counts;  // [E] used pairs per expert, on the tokens' device
    const at::Tensor slot_of = kernels::slots_by_expert(routing.expert_ids, dims_.num_experts, counts, routing.weights);  // [T, slots]
    const at::Tensor permuted = kernels::permute_rows(hidden, slot_of);  // [T * slots, H], the used rows first
    // Both paths return [T * slots, H] with zero rows for the unused pairs, which the combine weighs by 0.
    return kernels::unpermute_combine(hidden.is_cuda() ? fused_experts(permuted, counts) : loop_experts(permuted, counts), slot_of,
                                      routing.weights);  // [T, H]
  }

  std::vector<Parameter> parameters() override { return weights_.parameters(); }

 private:
  // CPU: each expert on its block of the used rows.
  at::Tensor loop_experts(const at::Tensor& permuted, const at::Tensor& counts) {
    const at::Tensor on_host = counts.to(at::kCPU);
    const std::vector<int64_t> rows(on_host.data_ptr<int64_t>(), on_host.data_ptr<int64_t>() + on_host.numel());
    const int64_t used = std::accumulate(rows.begin(), rows.end(), int64_t{0});
    const at::Tensor out = weights_.apply_grouped(permuted.narrow(0, 0, used), rows);  // [used, H]
    return used == permuted.size(0) ? out : at::constant_pad_nd(out, {0, 0, 0, permuted.size(0) - used});
  }

  // CUDA: each projection of every expert as one grouped GEMM, the activation fused (pithtrain/kernels.h).
  // The counts stay on the device: in bfloat16 no step of this waits for the host.
  at::Tensor fused_experts(const at::Tensor& permuted, const at::Tensor& counts) {
    // Bias rows: row i belongs to the expert whose block holds it (the row count given, so no sync). The
    // rows after the used ones form one more block that gets no bias, so an unused slot's row stays 0.
    at::Tensor bias_of_row;  // [T * slots, 1] 1 on the used rows
    at::Tensor expert_of_row;
    if (weights_.gate_bias.defined()) {
      const int64_t rows = permuted.size(0);
      const at::Tensor blocks = at::cat({counts, (rows - counts.sum()).reshape({1})});                  // [E + 1]
      const at::Tensor expert = at::arange(dims_.num_experts + 1, counts.options()).clamp_max(dims_.num_experts - 1);
      expert_of_row = at::repeat_interleave(expert, blocks, 0, rows);                                        // [T * slots]
      bias_of_row = (at::arange(rows, counts.options()) < counts.sum()).unsqueeze(1).to(permuted.scalar_type());
    }
    auto project = [&](const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
      at::Tensor out = kernels::grouped_mm(x, weight, counts);  // [T * slots, out], unused rows 0
      return bias.defined() ? out + bias.index_select(0, expert_of_row) * bias_of_row : out;
    };
    const at::Tensor inner = kernels::swiglu(project(permuted, weights_.gate_proj, weights_.gate_bias),
                                             project(permuted, weights_.up_proj, weights_.up_bias), weights_.activation != "swiglu",
                                             weights_.swiglu_alpha, weights_.swiglu_limit);  // [T * slots, F]
    return project(inner, weights_.down_proj, weights_.down_bias);                          // [T * slots, H]
  }

  ModelDims dims_;
  ExpertWeights weights_;
};

}  // namespace

std::unique_ptr<Experts> make_grouped_experts(Options& options, const PluginContext& context) {
  return std::make_unique<GroupedExperts>(options, context);
}

}  // namespace pithtrain
