// LoopExperts: the reference expert layout, one SwiGLU expert at a time on the tokens that chose it.
#include <ATen/ATen.h>

#include "pithtrain/experts.h"
#include "pithtrain/nn.h"

namespace pithtrain {
namespace {

class LoopExperts final : public Experts {
 public:
  LoopExperts(Options& options, const PluginContext& context) : dims_(context.dims), weights_(options, context) {}

  at::Tensor forward(const at::Tensor& hidden, const Routing& routing) override {
    const int64_t slots = routing.expert_ids.size(1);
    at::Tensor flat_weights = routing.weights.reshape(-1);  // [T * slots]
    const at::Tensor used = used_slots(routing.weights);    // [T, slots]: weight 0 is an unused slot, skipped
    at::Tensor out = at::zeros_like(hidden);                // [T, H]
    for (int64_t expert = 0; expert < dims_.num_experts; ++expert) {
      at::Tensor chosen = at::nonzero((routing.expert_ids == expert) & used);  // [n, 2]: (token, slot)
      if (chosen.size(0) == 0) continue;
      at::Tensor tokens = chosen.select(1, 0), slot = chosen.select(1, 1);  // [n]
      at::Tensor expert_out = weights_.apply(hidden.index_select(0, tokens), expert);
      at::Tensor weight = flat_weights.index_select(0, tokens * slots + slot).unsqueeze(1);  // [n, 1]
      out = out.index_add(0, tokens, expert_out * weight);
    }
    return out;
  }

  std::vector<Parameter> parameters() override { return weights_.parameters(); }

 private:
  ModelDims dims_;
  ExpertWeights weights_;
};

}  // namespace

std::unique_ptr<Experts> make_loop_experts(Options& options, const PluginContext& context) {
  return std::make_unique<LoopExperts>(options, context);
}

}  // namespace pithtrain
