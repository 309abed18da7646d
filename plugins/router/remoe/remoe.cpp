// ReMoERouter: ReLU routing with an adaptive L1 penalty (Wang et al., "ReMoE: Fully Differentiable
// Mixture-of-Experts with ReLU Routing", ICLR 2025, arXiv:2412.14711). Formulas in README.md.
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "pithtrain/distributed.h"
#include "pithtrain/nn.h"
#include "pithtrain/router.h"

namespace pithtrain {
namespace {

// One L1 coefficient for the whole model, moved by the sparsity of all its ReMoE layers together: shared
// by every layer's router through PluginContext::shared.
struct Controller {
  at::Tensor coefficient;     // [1] float64, lambda; saved with every layer as buffer l1_coefficient
  int64_t layers = 0;         // ReMoE routers built in this model
  int64_t stepped = 0;        // of them, how many saw this optimizer step's after_optimizer_step()
  double active_pairs = 0;    // (token, expert) pairs with a positive gate, this step, all layers
  double possible_pairs = 0;  // tokens * experts, this step, all layers
};

class ReMoERouter final : public Router {
 public:
  ReMoERouter(Options& options, const PluginContext& context) : dims_(context.dims), communicator_(context.communicator) {
    initial_coefficient_ = options.number("l1_coeff_init", 1e-8, Range::above(0));
    multiplier_ = options.number("l1_coeff_multiplier", 1.2, Range::above(1));
    const double default_target = 1.0 - static_cast<double>(dims_.top_k) / static_cast<double>(dims_.num_experts);
    target_sparsity_ = options.number("target_sparsity", default_target, Range::half_open(0, 1));
    load_balance_ = options.boolean("load_balance", true);
    if (context.pipeline_group)
      throw Error("router remoe: parallel.pipeline > 1 is not supported: its one L1 coefficient follows the sparsity of all "
                  "layers, and a pipeline stage sees only its own (use parallel.pipeline = 1, or another router)");
    gate_ = normal_parameter({dims_.num_experts, dims_.hidden_size}, dims_.init_std, context);  // [E, H]
    controller_ = context.shared->get<Controller>("remoe.controller");
    if (controller_->layers++ == 0)
      controller_->coefficient = at::full({1}, initial_coefficient_, at::TensorOptions().dtype(at::kDouble).device(context.device));
  }

  Routing route(const at::Tensor& hidden) override {
    const auto compute_dtype = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const int64_t tokens = hidden.size(0), experts = dims_.num_experts;
    const at::Tensor gates = at::relu(pithtrain::linear(hidden, gate_).to(compute_dtype));  // [T, E], R(x)
    const at::Tensor active = gates.detach() > 0;                                          // [T, E]
    // Slots: as many as the busiest token uses (at least 1), its experts by falling gate; the rest of a
    // token's slots then have gate 0 and are unused (pithtrain/router.h).
    const int64_t slots = std::max<int64_t>(1, active.sum(1).max().item<int64_t>());
    auto [weights, expert_ids] = at::topk(gates, slots, -1);  // [T, slots]
    Routing routing;
    routing.expert_ids = expert_ids;
    routing.weights = weights.to(hidden.scalar_type());
    routing.tokens_per_expert = count_used_pairs(expert_ids, routing.weights, experts);  // [E]

    // L1 penalty, the paper's L_reg for this layer (the 1/L over layers: each layer adds 1/layers of it):
    // mean over tokens of sum_e w_e R(x)_e, with w_e = 1, or with load_balance f_e = E/(k T) * (tokens
    // whose gate e is positive), detached.
    at::Tensor per_expert = gates.sum(0) / static_cast<double>(tokens);  // [E]
    if (load_balance_) {
      const at::Tensor f = active.to(compute_dtype).sum(0) * (static_cast<double>(experts) / (static_cast<double>(dims_.top_k) * tokens));
      per_expert = per_expert * f;
    }
    const at::Tensor coefficient = controller_->coefficient.to(compute_dtype) / static_cast<double>(controller_->layers);
    routing.loss_terms.push_back({"l1", (coefficient * per_expert.sum()).squeeze(0)});
    routing.aux_loss = routing.loss_terms.back().tensor;
    routing.statistics.push_back({"l1_coefficient", controller_->coefficient.detach().squeeze(0)});
    if (at::GradMode::is_enabled()) {  // training: the controller's sparsity counts (not evaluation's)
      controller_->active_pairs += active.sum().item<double>();
      controller_->possible_pairs += static_cast<double>(tokens * experts);
    }
    return routing;
  }

  // Once every layer has seen the step: lambda *= alpha when the measured sparsity is below the target
  // (too many experts active), lambda /= alpha when above; unchanged when equal.
  void after_optimizer_step() override {
    if (++controller_->stepped < controller_->layers) return;
    controller_->stepped = 0;
    std::vector<at::Tensor> counts = {at::tensor({controller_->active_pairs, controller_->possible_pairs}, at::kDouble)};
    if (communicator_) communicator_->all_reduce_sum(counts);  // every data rank's tokens: one lambda everywhere
    controller_->active_pairs = controller_->possible_pairs = 0;
    const double possible = counts[0][1].item<double>();
    if (possible <= 0) return;
    const double sparsity = 1.0 - counts[0][0].item<double>() / possible;
    const double direction = sparsity < target_sparsity_ ? 1.0 : sparsity > target_sparsity_ ? -1.0 : 0.0;
    controller_->coefficient.mul_(std::pow(multiplier_, direction));
  }

  bool variable_experts_per_token() const override { return true; }

  std::vector<Parameter> parameters() override { return {{"gate.weight", gate_, true}}; }
  // Every layer saves the one shared coefficient; loading writes the same value into it once per layer.
  std::vector<NamedTensor> buffers() override { return {{"l1_coefficient", controller_->coefficient}}; }

 private:
  ModelDims dims_;
  std::shared_ptr<Communicator> communicator_;  // data parallel: the sparsity counts cover every rank
  double initial_coefficient_ = 1e-8, multiplier_ = 1.2, target_sparsity_ = 0.75;
  bool load_balance_ = true;
  at::Tensor gate_;  // [E, H]
  std::shared_ptr<Controller> controller_;
};

}  // namespace

std::unique_ptr<Router> make_remoe_router(Options& options, const PluginContext& context) {
  return std::make_unique<ReMoERouter>(options, context);
}

}  // namespace pithtrain
