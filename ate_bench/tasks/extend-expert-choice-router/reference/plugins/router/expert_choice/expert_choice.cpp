// ExpertChoiceRouter: expert-choice routing (Zhou et al., arXiv:2202.09368). Experts pick tokens, not the
// reverse: each expert takes the `capacity` tokens with the highest affinity, so every expert is exactly
// full and no balancing loss is needed; a token may get any number of experts (kept up to top_k slots).
#include <ATen/ATen.h>

#include <cmath>

#include "pithtrain/nn.h"
#include "pithtrain/router.h"

namespace pithtrain {
namespace {

class ExpertChoiceRouter final : public Router {
 public:
  ExpertChoiceRouter(Options& options, const PluginContext& context) : dims_(context.dims) {
    capacity_factor_ = options.number("capacity_factor", 1.0);
    if (capacity_factor_ <= 0) throw Error(options.where("capacity_factor") + ": capacity_factor must be positive");
    gate_ = normal_parameter({dims_.num_experts, dims_.hidden_size}, dims_.init_std, context);  // [E, H]
  }

  Routing route(const at::Tensor& hidden) override {
    const int64_t tokens = hidden.size(0), experts = dims_.num_experts, k = dims_.top_k;
    const auto compute_dtype = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor probs = at::softmax(at::linear(hidden, gate_).to(compute_dtype), -1);  // [T, E]
    const int64_t capacity = std::clamp<int64_t>(
        static_cast<int64_t>(std::ceil(capacity_factor_ * tokens * k / static_cast<double>(experts))), 1, tokens);
    at::Tensor picked_tokens = std::get<1>(at::topk(probs.detach().t(), capacity, -1));  // [E, C]
    at::Tensor picked = at::zeros({experts, tokens}, at::TensorOptions().dtype(at::kBool).device(probs.device()))
                            .scatter(1, picked_tokens, true).t();                         // [T, E]
    // Slots: the experts that picked the token, by probability (at most top_k), then its most probable
    // other experts at weight 0.
    at::Tensor order_key = probs.detach() + picked.to(compute_dtype) * 2.0;
    at::Tensor expert_ids = std::get<1>(at::topk(order_key, k, -1));                     // [T, k]
    at::Tensor kept = picked.gather(1, expert_ids);                                      // [T, k]
    at::Tensor slot_probs = probs.gather(1, expert_ids);
    at::Tensor weights = at::where(kept, slot_probs, at::zeros_like(slot_probs));        // [T, k]
    Routing routing;
    routing.expert_ids = expert_ids;
    routing.weights = weights.to(hidden.scalar_type());
    routing.tokens_per_expert = count_used_pairs(expert_ids, routing.weights, experts);  // the used slots
    routing.aux_loss = at::zeros({}, probs.options());
    return routing;
  }

  std::vector<Parameter> parameters() override { return {{"gate.weight", gate_, true}}; }

 private:
  ModelDims dims_;
  double capacity_factor_ = 1.0;
  at::Tensor gate_;  // [E, H]
};

}  // namespace

std::unique_ptr<Router> make_expert_choice_router(Options& options, const PluginContext& context) {
  return std::make_unique<ExpertChoiceRouter>(options, context);
}

}  // namespace pithtrain
