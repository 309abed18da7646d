// AuxFreeRouter: DeepSeek-V3's auxiliary-loss-free load balancing (arXiv:2412.19437, section 2.1.2).
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "pithtrain/distributed.h"
#include "pithtrain/kernels.h"
#include "pithtrain/nn.h"
#include "pithtrain/router.h"

namespace pithtrain {
namespace {

class AuxFreeRouter final : public Router {
 public:
  AuxFreeRouter(Options& options, const PluginContext& context) : dims_(context.dims) {
    update_rate_ = options.number("update_rate", 1e-3, Range::at_least(0));
    scaling_factor_ = options.number("routed_scaling_factor", 1.0, Range::above(0));
    renormalize_ = options.boolean("renormalize", true);
    num_groups_ = options.integer("num_groups", 1, Range::closed(1, static_cast<double>(dims_.num_experts)));
    const int64_t group_size = dims_.num_experts / num_groups_;
    options.require("num_groups", dims_.num_experts % num_groups_ == 0 && (num_groups_ == 1 || group_size >= 2),
                    "a divisor of num_experts (" + std::to_string(dims_.num_experts) + ") giving groups of at least 2 experts");
    seq_aux_loss_coeff_ = options.number("seq_aux_loss_coeff", 0.0, Range::at_least(0));
    z_loss_coeff_ = options.number("z_loss_coeff", 0.0, Range::at_least(0));
    capacity_factor_ = options.number("capacity_factor", 0.0, Range::at_least(0));
    freeze_bias_ = options.boolean("freeze_bias", false);
    // The chosen groups must hold top_k experts: at least ceil(top_k / group_size) of them.
    const int64_t fewest_groups = (dims_.top_k + group_size - 1) / group_size;
    topk_groups_ = options.integer("topk_groups", num_groups_,
                                   Range::closed(static_cast<double>(fewest_groups), static_cast<double>(num_groups_)));
    gate_ = normal_parameter({dims_.num_experts, dims_.hidden_size}, dims_.init_std, context);  // [E, H]
    context_communicator_ = context.communicator;
    context_group_ = context.context_group;
    auto options_of = at::TensorOptions().device(context.device);
    bias_ = at::zeros({dims_.num_experts}, options_of.dtype(context.dtype == at::kDouble ? at::kDouble : at::kFloat));
    load_ = at::zeros({dims_.num_experts}, options_of.dtype(at::kLong));
  }

  Routing route(const at::Tensor& hidden) override {
    const auto compute_dtype = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor logits = pithtrain::linear(hidden, gate_).to(compute_dtype);  // [T, E]
    at::Tensor scores, expert_ids, weights;
    if (hidden.is_cuda() && topk_groups_ == num_groups_ && compute_dtype == at::kFloat) {
      // One fused kernel for scores, biased choice, renormalisation and scaling (pithtrain/kernels.h).
      kernels::TopK top = kernels::route_topk(logits, bias_, dims_.top_k, /*sigmoid=*/true, renormalize_, scaling_factor_);
      scores = top.scores, expert_ids = top.expert_ids, weights = top.weights;
    } else {
      scores = at::sigmoid(logits);                           // [T, E]
      // The bias steers only which experts are chosen; the gate weights come from the unbiased scores.
      at::Tensor for_choice = scores.detach() + bias_;                                          // [T, E]
      if (topk_groups_ < num_groups_) {
        // Node-limited routing (DeepSeek-V3): keep the topk_groups groups whose two best biased scores sum highest.
        at::Tensor grouped = for_choice.view({for_choice.size(0), num_groups_, -1});            // [T, G, E / G]
        at::Tensor group_scores = std::get<0>(at::topk(grouped, 2, -1)).sum(-1);               // [T, G]
        at::Tensor groups = std::get<1>(at::topk(group_scores, topk_groups_, -1));             // [T, topk_groups]
        at::Tensor keep = at::zeros_like(group_scores, at::kBool).scatter(1, groups, true);
        for_choice = grouped.masked_fill(~keep.unsqueeze(-1), -INFINITY).view_as(for_choice);
      }
      expert_ids = std::get<1>(at::topk(for_choice, dims_.top_k, -1));              // [T, k]
      weights = scores.gather(1, expert_ids);                                        // [T, k]
      if (renormalize_) weights = weights / (weights.sum(-1, /*keepdim=*/true) + 1e-20);
      weights = weights * scaling_factor_;
    }
    Routing routing;
    routing.expert_ids = expert_ids;
    routing.weights = weights.to(hidden.scalar_type());
    routing.tokens_per_expert = count_used_pairs(expert_ids, routing.weights, dims_.num_experts);  // [E]
    // No balancing loss is needed; DeepSeek-V3 still adds a tiny sequence-wise one (alpha = 1e-4).
    routing.aux_loss = at::zeros({}, at::TensorOptions().dtype(compute_dtype).device(hidden.device()));
    if (seq_aux_loss_coeff_ > 0)
      routing.loss_terms.push_back({"sequence", seq_aux_loss_coeff_ * sequence_balance_loss(scores, expert_ids, dims_.seq_len, context_group_.get())});
    if (z_loss_coeff_ > 0) routing.loss_terms.push_back({"z", z_loss_coeff_ * router_z_loss(logits)});
    for (const auto& term : routing.loss_terms) routing.aux_loss = routing.aux_loss + term.tensor;
    if (at::GradMode::is_enabled()) load_ += routing.tokens_per_expert;  // training: count toward the update
    apply_expert_capacity(routing, capacity_factor_, dims_.num_experts);
    return routing;
  }

  // bias_e += update_rate * sign(mean_load - load_e), over the load of the step just taken.
  void after_optimizer_step() override {
    at::NoGradGuard no_grad;
    at::Tensor load = load_.to(bias_.scalar_type());
    if (context_communicator_) {  // data parallel: the bias follows the load of the whole global batch
      std::vector<at::Tensor> shared = {load};
      context_communicator_->all_reduce_sum(shared);
    }
    // A step without load (every count 0) changes nothing: sign(0 - 0) is 0, and no host read is needed.
    if (!freeze_bias_) bias_ += update_rate_ * at::sign(load.mean() - load);
    load_.zero_();
  }

  std::vector<Parameter> parameters() override { return {{"gate.weight", gate_, true}}; }
  std::vector<NamedTensor> buffers() override { return {{"expert_bias", bias_}}; }

 private:
  ModelDims dims_;
  double update_rate_ = 1e-3;
  double scaling_factor_ = 1.0, seq_aux_loss_coeff_ = 0.0, z_loss_coeff_ = 0.0, capacity_factor_ = 0.0;
  bool freeze_bias_ = false;
  std::shared_ptr<Communicator> context_group_;  // context parallel: the ranks sharing each sequence
  std::shared_ptr<Communicator> context_communicator_;  // data-parallel runs: sums the load over ranks  // fine-tuning: keep the loaded bias
  bool renormalize_ = true;
  int64_t num_groups_ = 1, topk_groups_ = 1;
  at::Tensor gate_;  // [E, H]
  at::Tensor bias_;  // [E] routing bias, saved with the model
  at::Tensor load_;  // [E] tokens routed to each expert since the last optimizer step
};

}  // namespace

std::unique_ptr<Router> make_aux_free_router(Options& options, const PluginContext& context) {
  return std::make_unique<AuxFreeRouter>(options, context);
}

}  // namespace pithtrain
