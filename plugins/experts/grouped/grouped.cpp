// GroupedExperts: permute tokens so each expert's are contiguous, run each expert on its slice, unpermute.
// The layout a grouped GEMM kernel wants; numerically the same as `loop`.
#include <ATen/ATen.h>

#include "pithtrain/experts.h"
#include "pithtrain/nn.h"

namespace pithtrain {
namespace {

class GroupedExperts final : public Experts {
 public:
  GroupedExperts(Options& options, const PluginContext& context) : dims_(context.dims), weights_(options, context) {}

  at::Tensor forward(const at::Tensor& hidden, const Routing& routing) override {
    const int64_t k = routing.expert_ids.size(1);
    at::Tensor flat_ids = routing.expert_ids.reshape(-1);                                // [T * k]
    // A stable sort keeps (token, slot) order within each expert, as the loop visits them.
    at::Tensor order = std::get<1>(at::sort(flat_ids, /*stable=*/true, 0, false));        // [T * k]
    at::Tensor source_token = at::floor_divide(order, k);                                  // [T * k]
    at::Tensor permuted = hidden.index_select(0, source_token);                           // [T * k, H]
    at::Tensor permuted_weights = routing.weights.reshape(-1).index_select(0, order);     // [T * k]
    at::Tensor counts = at::bincount(flat_ids, {}, dims_.num_experts).to(at::kCPU);       // [E]
    const int64_t* tokens_per_expert = counts.data_ptr<int64_t>();
    std::vector<at::Tensor> outputs;
    int64_t offset = 0;
    for (int64_t expert = 0; expert < dims_.num_experts; ++expert) {
      const int64_t count = tokens_per_expert[expert];
      if (count == 0) continue;
      outputs.push_back(weights_.apply(permuted.narrow(0, offset, count), expert));
      offset += count;
    }
    at::Tensor expert_out = at::cat(outputs, 0) * permuted_weights.unsqueeze(1);  // [T * k, H]
    return at::zeros_like(hidden).index_add(0, source_token, expert_out);        // [T, H]
  }

  std::vector<Parameter> parameters() override { return weights_.parameters(); }

 private:
  ModelDims dims_;
  ExpertWeights weights_;
};

}  // namespace

std::unique_ptr<Experts> make_grouped_experts(Options& options, const PluginContext& context) {
  return std::make_unique<GroupedExperts>(options, context);
}

}  // namespace pithtrain
