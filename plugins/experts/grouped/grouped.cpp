// GroupedExperts: permute tokens so each expert's are contiguous, run each expert on its slice, unpermute.
// The layout a grouped GEMM kernel wants; numerically the same as `loop`.
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
    if (hidden.is_cuda()) return forward_fused(hidden, routing);
    const int64_t k = routing.expert_ids.size(1);
    at::Tensor flat_ids = routing.expert_ids.reshape(-1);                                // [T * k]
    // A stable sort keeps (token, slot) order within each expert, as the loop visits them.
    at::Tensor order = std::get<1>(at::sort(flat_ids, /*stable=*/true, 0, false));        // [T * k]
    at::Tensor source_token = at::floor_divide(order, k);                                  // [T * k]
    at::Tensor permuted = hidden.index_select(0, source_token);                           // [T * k, H]
    at::Tensor permuted_weights = routing.weights.reshape(-1).index_select(0, order);     // [T * k]
    at::Tensor counts = at::bincount(flat_ids, {}, dims_.num_experts).to(at::kCPU);       // [E]
    const std::vector<int64_t> tokens_per_expert(counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + dims_.num_experts);
    at::Tensor expert_out = weights_.apply_grouped(permuted, tokens_per_expert) * permuted_weights.unsqueeze(1);  // [T * k, H]
    return at::zeros_like(hidden).index_add(0, source_token, expert_out);        // [T, H]
  }

  std::vector<Parameter> parameters() override { return weights_.parameters(); }

 private:
  // CUDA: the permutation and the weighted combine as kernels, each projection of every expert as one
  // grouped GEMM, the activation fused (pithtrain/kernels.h).
  at::Tensor forward_fused(const at::Tensor& hidden, const Routing& routing) {
    at::Tensor counts_tensor;
    const at::Tensor slot_of = kernels::slots_by_expert(routing.expert_ids, dims_.num_experts, counts_tensor);  // [T, k]
    const at::Tensor counts_on_host = counts_tensor.to(at::kCPU);
    const std::vector<int64_t> counts(counts_on_host.data_ptr<int64_t>(), counts_on_host.data_ptr<int64_t>() + dims_.num_experts);
    const at::Tensor permuted = kernels::permute_rows(hidden, slot_of);  // [T * k, H]
    // Bias rows: row i belongs to the expert whose block holds it.
    const at::Tensor expert_of_row = weights_.gate_bias.defined()
        ? at::repeat_interleave(at::arange(dims_.num_experts, counts_tensor.options()), counts_tensor) : at::Tensor();
    auto project = [&](const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
      at::Tensor out = kernels::grouped_mm(x, weight, counts);  // [T * k, out]
      return bias.defined() ? out + bias.index_select(0, expert_of_row) : out;
    };
    const at::Tensor inner = kernels::swiglu(project(permuted, weights_.gate_proj, weights_.gate_bias),
                                             project(permuted, weights_.up_proj, weights_.up_bias), weights_.activation != "swiglu",
                                             weights_.swiglu_alpha, weights_.swiglu_limit);  // [T * k, F]
    const at::Tensor expert_out = project(inner, weights_.down_proj, weights_.down_bias);   // [T * k, H]
    return kernels::unpermute_combine(expert_out, slot_of, routing.weights.to(at::kFloat));  // [T, H]
  }


  ModelDims dims_;
  ExpertWeights weights_;
};

}  // namespace

std::unique_ptr<Experts> make_grouped_experts(Options& options, const PluginContext& context) {
  return std::make_unique<GroupedExperts>(options, context);
}

}  // namespace pithtrain
