// TopAnyRouter: top-any gating after DynMoE (Guo et al., arXiv:2405.14297). score = sigmoid(cos(x, W_e));
// a token takes every expert whose score exceeds sigmoid(threshold_e), weighted by its margin above the
// threshold, so the number of experts per token varies and the thresholds are trained through the weights.
#include <ATen/ATen.h>

#include "pithtrain/nn.h"
#include "pithtrain/router.h"

namespace pithtrain {
namespace {

class TopAnyRouter final : public Router {
 public:
  TopAnyRouter(Options&, const PluginContext& context) : dims_(context.dims) {
    gate_ = normal_parameter({dims_.num_experts, dims_.hidden_size}, dims_.init_std, context);  // [E, H]
    threshold_ = at::zeros({dims_.num_experts}, at::TensorOptions().dtype(context.dtype).device(context.device))
                     .requires_grad_(true);  // [E]
  }

  Routing route(const at::Tensor& hidden) override {
    const int64_t k = dims_.top_k;
    at::Tensor x = hidden / hidden.norm(2, -1, true).clamp_min(1e-12);  // [T, H]
    at::Tensor w = gate_ / gate_.norm(2, -1, true).clamp_min(1e-12);   // [E, H]
    at::Tensor score = at::sigmoid(at::matmul(x, w.t()));                // [T, E]
    at::Tensor margin = score - at::sigmoid(threshold_);                  // [T, E]
    at::Tensor selected = margin > 0;                                     // [T, E]
    // Slots: the selected experts by score (at most top_k), then the best unselected ones at weight 0.
    at::Tensor order_key = score.detach() + selected.to(score.scalar_type()) * 2.0;  // selected first
    at::Tensor expert_ids = std::get<1>(at::topk(order_key, k, -1));                  // [T, k]
    at::Tensor kept = selected.gather(1, expert_ids);                                // [T, k]
    at::Tensor none = kept.logical_not().all(-1, true);                              // [T, 1]: nothing selected
    // A token that selects nothing takes its best expert with weight 1.
    at::Tensor first_slot = at::zeros_like(kept).index_fill(1, at::zeros({1}, at::kLong).to(kept.device()), true);
    at::Tensor fallback = none & first_slot;                                         // [T, k]
    at::Tensor raw = at::where(kept, margin.gather(1, expert_ids), at::zeros_like(margin.gather(1, expert_ids)));
    at::Tensor total = raw.sum(-1, true);
    at::Tensor weights = at::where(none, fallback.to(raw.scalar_type()), raw / at::where(none, at::ones_like(total), total));
    Routing routing;
    routing.expert_ids = expert_ids;
    routing.weights = weights.to(hidden.scalar_type());
    routing.tokens_per_expert = count_used_pairs(expert_ids, routing.weights, dims_.num_experts);  // the used slots
    routing.aux_loss = at::zeros({}, score.options());
    return routing;
  }

  std::vector<Parameter> parameters() override { return {{"gate.weight", gate_, true}, {"threshold", threshold_, false}}; }

 private:
  ModelDims dims_;
  at::Tensor gate_;       // [E, H] expert embeddings
  at::Tensor threshold_;  // [E] trained thresholds (pre-sigmoid)
};

}  // namespace

std::unique_ptr<Router> make_top_any_capped_router(Options& options, const PluginContext& context) {
  return std::make_unique<TopAnyRouter>(options, context);
}

}  // namespace pithtrain
