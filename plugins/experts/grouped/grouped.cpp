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
    at::Tensor counts;  // [E], on the tokens' device
    const at::Tensor slot_of = kernels::slots_by_expert(routing.expert_ids, dims_.num_experts, counts);  // [T, k]
    const at::Tensor permuted = kernels::permute_rows(hidden, slot_of);  // [T * k, H]
    return kernels::unpermute_combine(hidden.is_cuda() ? fused_experts(permuted, counts) : loop_experts(permuted, counts), slot_of,
                                      routing.weights);  // [T, H]
  }

  std::vector<Parameter> parameters() override { return weights_.parameters(); }

 private:
  // CPU: each expert on its block of rows.
  at::Tensor loop_experts(const at::Tensor& permuted, const at::Tensor& counts) {
    const at::Tensor on_host = counts.to(at::kCPU);
    return weights_.apply_grouped(permuted, std::vector<int64_t>(on_host.data_ptr<int64_t>(), on_host.data_ptr<int64_t>() + on_host.numel()));
  }

  // CUDA: each projection of every expert as one grouped GEMM, the activation fused (pithtrain/kernels.h).
  // The counts stay on the device: in bfloat16 no step of this waits for the host.
  at::Tensor fused_experts(const at::Tensor& permuted, const at::Tensor& counts) {
    // Bias rows: row i belongs to the expert whose block holds it (the row count given, so no sync).
    const at::Tensor expert_of_row = weights_.gate_bias.defined()
        ? at::repeat_interleave(at::arange(dims_.num_experts, counts.options()), counts, 0, permuted.size(0)) : at::Tensor();
    auto project = [&](const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
      at::Tensor out = kernels::grouped_mm(x, weight, counts);  // [T * k, out]
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
