// TopKSoftmaxRouter: softmax gate, top-k choice, Switch-Transformer load-balancing loss.
#include <ATen/ATen.h>

#include <functional>

#include "pithtrain/kernels.h"
#include "pithtrain/nn.h"
#include "pithtrain/router.h"

namespace pithtrain {
namespace {

class TopKSoftmaxRouter final : public Router {
 public:
  TopKSoftmaxRouter(Options& options, const PluginContext& context) : dims_(context.dims) {
    renormalize_ = options.boolean("renormalize", true);
    aux_loss_coeff_ = options.number("aux_loss_coeff", 0.01, Range::at_least(0));
    seq_aux_loss_coeff_ = options.number("seq_aux_loss_coeff", 0.0, Range::at_least(0));
    global_aux_loss_coeff_ = options.number("global_aux_loss_coeff", 0.0, Range::at_least(0));
    communicator_ = context.communicator;
    context_group_ = context.context_group;
    z_loss_coeff_ = options.number("z_loss_coeff", 0.0, Range::at_least(0));
    capacity_factor_ = options.number("capacity_factor", 0.0, Range::at_least(0));
    scaling_factor_ = options.number("scaling_factor", 1.0, Range::above(0));
    num_groups_ = options.integer("num_groups", 1, Range::closed(1, static_cast<double>(dims_.num_experts)));
    options.require("num_groups", dims_.num_experts % num_groups_ == 0,
                    "a divisor of num_experts (" + std::to_string(dims_.num_experts) + ")");
    const int64_t group_size = dims_.num_experts / num_groups_;
    // The chosen groups must hold top_k experts: at least ceil(top_k / group_size) of them.
    const int64_t fewest_groups = (dims_.top_k + group_size - 1) / group_size;
    topk_groups_ = options.integer("topk_groups", num_groups_,
                                   Range::closed(static_cast<double>(fewest_groups), static_cast<double>(num_groups_)));
    gate_ = normal_parameter({dims_.num_experts, dims_.hidden_size}, dims_.init_std, context);  // [E, H]
    if (options.boolean("bias", false))  // GPT-OSS: a learned per-expert offset of the router logits
      gate_bias_ = at::zeros({dims_.num_experts}, at::TensorOptions().dtype(context.dtype).device(context.device)).requires_grad_(true);
  }

  Routing route(const at::Tensor& hidden) override {
    const auto compute_dtype = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor logits = pithtrain::linear(hidden, gate_, gate_bias_).to(compute_dtype);  // [T, E]
    at::Tensor probs, weights, expert_ids;
    if (hidden.is_cuda() && topk_groups_ == num_groups_ && compute_dtype == at::kFloat) {
      // One fused kernel for softmax, top-k, renormalisation and scaling (pithtrain/kernels.h).
      kernels::TopK top = kernels::route_topk(logits, at::Tensor(), dims_.top_k, /*sigmoid=*/false, renormalize_, scaling_factor_);
      probs = top.scores, expert_ids = top.expert_ids, weights = top.weights;
    } else {
      probs = at::softmax(logits, -1);  // [T, E]
      at::Tensor choosable = probs;
      if (topk_groups_ < num_groups_) {
        // Group-limited routing (DeepSeek-V2): keep the topk_groups groups with the highest best expert.
        at::Tensor grouped = probs.view({probs.size(0), num_groups_, -1});                       // [T, G, E / G]
        at::Tensor groups = std::get<1>(at::topk(std::get<0>(grouped.max(-1)), topk_groups_, -1));  // [T, topk_groups]
        at::Tensor keep = at::zeros({probs.size(0), num_groups_}, probs.options()).scatter(1, groups, 1.0);
        choosable = (grouped * keep.unsqueeze(-1)).view_as(probs);
      }
      std::tie(weights, expert_ids) = at::topk(choosable, dims_.top_k, -1);  // [T, k]
      if (renormalize_) weights = weights / weights.sum(-1, /*keepdim=*/true);
      weights = weights * scaling_factor_;
    }
    Routing routing;
    routing.expert_ids = expert_ids;
    routing.weights = weights.to(hidden.scalar_type());
    routing.tokens_per_expert = count_used_pairs(expert_ids, routing.weights, dims_.num_experts);  // [E]
    // Each configured loss is one named term; aux_loss is their sum (router.h has the formulas).
    routing.aux_loss = at::zeros({}, probs.options());
    auto add = [&](const char* name, double coeff, const std::function<at::Tensor()>& term) {
      if (coeff <= 0) return;
      routing.loss_terms.push_back({name, coeff * term()});
      routing.aux_loss = routing.aux_loss + routing.loss_terms.back().tensor;
    };
    // Under context parallelism a micro-batch's (and a sequence's) tokens are spread over the context
    // group: f counts them all, P stays this rank's (router.h).
    add("switch", aux_loss_coeff_, [&] { return switch_balance_loss(probs, expert_ids, context_group_.get()); });
    add("sequence", seq_aux_loss_coeff_, [&] { return sequence_balance_loss(probs, expert_ids, dims_.seq_len, context_group_.get()); });
    // Global-batch balance: f over every rank's tokens; under gradient accumulation over every
    // micro-batch of the step (counted by the core beforehand, set_step_counts).
    add("global", global_aux_loss_coeff_, [&] {
      return step_counts_.defined() ? balance_loss_from_counts(probs, step_counts_.to(probs.device()))
                                    : switch_balance_loss(probs, expert_ids, communicator_.get());
    });
    add("z", z_loss_coeff_, [&] { return router_z_loss(logits); });
    apply_expert_capacity(routing, capacity_factor_, dims_.num_experts);
    return routing;
  }

  bool needs_step_counts() const override { return global_aux_loss_coeff_ > 0; }
  void set_step_counts(const at::Tensor& tokens_per_expert) override { step_counts_ = tokens_per_expert; }

  std::vector<Parameter> parameters() override {
    std::vector<Parameter> result = {{"gate.weight", gate_, true}};
    if (gate_bias_.defined()) result.push_back({"gate.bias", gate_bias_, false});
    return result;
  }

 private:
  ModelDims dims_;
  bool renormalize_ = true;
  std::shared_ptr<Communicator> communicator_;  // data parallel: the global-batch loss sums counts over ranks
  std::shared_ptr<Communicator> context_group_;  // context parallel: the ranks sharing each sequence
  double global_aux_loss_coeff_ = 0.0;
  at::Tensor step_counts_;  // [E] this step's counts over micro-batches and ranks; undefined: count per call
  double aux_loss_coeff_ = 0.01, seq_aux_loss_coeff_ = 0.0, z_loss_coeff_ = 0.0, capacity_factor_ = 0.0, scaling_factor_ = 1.0;
  int64_t num_groups_ = 1, topk_groups_ = 1;
  at::Tensor gate_;       // [E, H]
  at::Tensor gate_bias_;  // [E] with bias = true
};

}  // namespace

std::unique_ptr<Router> make_topk_softmax_router(Options& options, const PluginContext& context) {
  return std::make_unique<TopKSoftmaxRouter>(options, context);
}

}  // namespace pithtrain
