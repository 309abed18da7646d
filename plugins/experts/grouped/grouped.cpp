// GroupedExperts: permute tokens so each expert's are contiguous, run each expert on its slice, combine
// back. The layout a grouped GEMM kernel wants; numerically the same as `loop`.
#include <ATen/ATen.h>

#include "pithtrain/experts.h"
#include "pithtrain/kernels.h"
#include "pithtrain/nn.h"

namespace pithtrain {
namespace {

class GroupedExperts final : public Experts {
 public:
  GroupedExperts(Options& options, const PluginContext& context) : dims_(context.dims), weights_(options, context) {}

  at::Tensor forward(const at::Tensor& hidden, const Routing& routing) override {
    // The (token, choice) pairs sorted by expert, stably, so each expert sees its tokens in the loop's order.
    at::Tensor counts;
    const at::Tensor slot_of = kernels::slots_by_expert(routing.expert_ids, dims_.num_experts, counts);  // [T, k]
    const at::Tensor counts_on_host = counts.to(at::kCPU);
    const std::vector<int64_t> tokens_per_expert(counts_on_host.data_ptr<int64_t>(), counts_on_host.data_ptr<int64_t>() + dims_.num_experts);
    const at::Tensor permuted = kernels::permute_rows(hidden, slot_of);  // [T * k, H]
    const at::Tensor expert_out = hidden.is_cuda() ? fused_experts(permuted, counts, tokens_per_expert)
                                                   : weights_.apply_grouped(permuted, tokens_per_expert);  // [T * k, H]
    return kernels::unpermute_combine(expert_out, slot_of, routing.weights);  // [T, H]
  }

  std::vector<Parameter> parameters() override { return weights_.parameters(); }

 private:
  // CUDA: each projection of every expert as one grouped GEMM, the activation fused (pithtrain/kernels.h).
  at::Tensor fused_experts(const at::Tensor& permuted, const at::Tensor& counts, const std::vector<int64_t>& tokens_per_expert) {
    // Bias rows: row i belongs to the expert whose block holds it.
    const at::Tensor expert_of_row = weights_.gate_bias.defined()
        ? at::repeat_interleave(at::arange(dims_.num_experts, counts.options()), counts) : at::Tensor();
    auto project = [&](const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
      at::Tensor out = kernels::grouped_mm(x, weight, tokens_per_expert);  // [T * k, out]
      return bias.defined() ? out + bias.index_select(0, expert_of_row) : out;
    };
    const at::Tensor inner = kernels::swiglu(project(permuted, weights_.gate_proj, weights_.gate_bias),
                                             project(permuted, weights_.up_proj, weights_.up_bias), weights_.activation != "swiglu",
                                             weights_.swiglu_alpha, weights_.swiglu_limit);  // [T * k, F]
    return project(inner, weights_.down_proj, weights_.down_bias);                          // [T * k, H]
  }

  ModelDims dims_;
  ExpertWeights weights_;
};

}  // namespace

std::unique_ptr<Experts> make_grouped_experts(Options& options, const PluginContext& context) {
  return std::make_unique<GroupedExperts>(options, context);
}

}  // namespace pithtrain
