// TopAnyRouter: DynMoE's top-any gating (Guo et al., "Dynamic Mixture of Experts: An Auto-Tuning
// Approach for Efficient Transformer Models", 2024): each token uses every expert whose score passes that
// expert's trainable threshold, at least one. Formulas in README.md.
#include <cmath>

#include <ATen/ATen.h>

#include "pithtrain/nn.h"
#include "pithtrain/router.h"

namespace pithtrain {
namespace {

class TopAnyRouter final : public Router {
 public:
  TopAnyRouter(Options& options, const PluginContext& context) : dims_(context.dims), communicator_(context.communicator) {
    aux_loss_coeff_ = options.number("aux_loss_coeff", 0.01, Range::at_least(0));
    const double threshold_init = options.number("threshold_init", 0.0, Range::closed(-1, 1));
    gate_ = normal_parameter({dims_.num_experts, dims_.hidden_size}, dims_.init_std, context);  // [E, H]
    thresholds_ = at::full({dims_.num_experts}, threshold_init, at::TensorOptions().dtype(context.dtype).device(context.device))
                      .requires_grad_(true);  // [E], G
  }

  Routing route(const at::Tensor& hidden) override {
    const auto compute_dtype = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    // s = cos(x_t, W_e): both normalised, so the threshold lives on a fixed scale ([-1, 1]).
    const at::Tensor x = hidden.to(compute_dtype), w = gate_.to(compute_dtype);
    const at::Tensor scores = at::matmul(x / at::linalg_vector_norm(x, 2, {-1}, true).clamp_min(1e-12),
                                         (w / at::linalg_vector_norm(w, 2, {-1}, true).clamp_min(1e-12)).t());  // [T, E]
    // h = sigmoid(s) - sigmoid(G): expert e is active for token t when h > 0.
    const at::Tensor margin = at::sigmoid(scores) - at::sigmoid(thresholds_.to(compute_dtype));  // [T, E]
    at::Tensor active = margin.detach() > 0;                                                        // [T, E]
    // A token above no threshold takes its best-scoring expert.
    const at::Tensor none = ~active.any(1);                                                         // [T]
    active = active | (at::zeros_like(active).scatter(1, scores.detach().argmax(1, true), true) & none.unsqueeze(1));
    const at::Tensor count = active.sum(1, true);                                                   // [T, 1] >= 1
    const int64_t slots = count.max().item<int64_t>();
    // Slots: the active experts by falling margin; a token with fewer has unused slots (weight 0).
    const at::Tensor ranked = std::get<1>(at::topk(at::where(active, margin.detach(), margin.detach() - 4.0), slots, -1));  // [T, slots]
    const at::Tensor used = active.gather(1, ranked).to(compute_dtype);                             // [T, slots]
    // Forward: the active experts' mean, 1 / |K(t)| each. Backward: straight through the hard gate to h,
    // so W and G learn (h - h.detach() is exactly 0 in the forward).
    const at::Tensor chosen_margin = margin.gather(1, ranked);
    const at::Tensor weights = (used / count.to(compute_dtype) + chosen_margin - chosen_margin.detach()) * used;
    Routing routing;
    routing.expert_ids = ranked;
    routing.weights = weights.to(hidden.scalar_type());
    routing.tokens_per_expert = count_used_pairs(ranked, routing.weights, dims_.num_experts);  // [E]
    routing.aux_loss = at::zeros({}, scores.options());
    if (aux_loss_coeff_ > 0) {
      // Switch balance over the used pairs, P from the sigmoid scores normalised per token.
      const at::Tensor probs = at::sigmoid(scores) / at::sigmoid(scores).sum(-1, true);
      routing.loss_terms.push_back({"switch", aux_loss_coeff_ * switch_balance_loss(probs, ranked, nullptr, routing.weights)});
      routing.aux_loss = routing.loss_terms.back().tensor;
    }
    return routing;
  }

  bool variable_experts_per_token() const override { return true; }
  bool straight_through() const override { return true; }

  std::vector<Parameter> parameters() override { return {{"gate.weight", gate_, true}, {"gate.threshold", thresholds_, false}}; }

 private:
  ModelDims dims_;
  std::shared_ptr<Communicator> communicator_;
  double aux_loss_coeff_ = 0.01;
  at::Tensor gate_;        // [E, H], the experts' representations W
  at::Tensor thresholds_;  // [E], G
};

}  // namespace

std::unique_ptr<Router> make_top_any_router(Options& options, const PluginContext& context) {
  return std::make_unique<TopAnyRouter>(options, context);
}

}  // namespace pithtrain
