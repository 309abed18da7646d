// Interface of a `router` plugin: which experts each token goes to, with what weight, and its loss.
#pragma once
#include <vector>

#include "pithtrain/plugin.h"

namespace pithtrain {

// Dimension legend: tokens = batch * seq, slots = the router's slots per token, experts = num_experts.
//
// The routing contract. A router fills `slots >= 1` (token, expert) pairs per token: top-k routers use
// slots = top_k, a router that picks a varying number of experts per token (ReLU or threshold routing)
// uses as many slots as it needs, even more than top_k. A slot whose weight is exactly 0 is unused: every
// experts plugin skips it (it is not computed, not sent and gets no gradient), and it is not counted in
// tokens_per_expert, the balance losses, the capacity or the load statistics. Its expert id must still be
// in [0, experts). The mean used slots per token is logged as router[].active_experts in metrics.jsonl.
struct Routing {
  at::Tensor expert_ids;         // [tokens, slots] int64, each in [0, experts)
  at::Tensor weights;            // [tokens, slots] gate weights, differentiable, the hidden dtype; 0: unused
  at::Tensor aux_loss;           // [] the router's loss, already scaled by its coefficient (0 if none)
  at::Tensor tokens_per_expert;  // [experts] int64, how many used (token, slot) pairs chose each expert
  // The terms aux_loss is the sum of, each already scaled by its coefficient, by name ("switch",
  // "sequence", "z", ...): the trainer logs each one and checks that they add up to aux_loss.
  std::vector<NamedTensor> loss_terms;
  // [] share of the used (token, slot) pairs dropped by an expert capacity (apply_expert_capacity);
  // undefined when the router is dropless.
  at::Tensor dropped_fraction;
  // Scalars [] the router wants watched that are not losses (e.g. ReMoE's L1 coefficient), by name: the
  // trainer logs their mean over layers and micro-batches as router_statistics.NAME in metrics.jsonl.
  std::vector<NamedTensor> statistics;
};

// The used slots of `weights` [tokens, slots]: a bool mask of the same shape, weight != 0.
at::Tensor used_slots(const at::Tensor& weights);
// tokens_per_expert for a Routing: the used pairs per expert, int64 [experts]; on CUDA without a host sync.
at::Tensor count_used_pairs(const at::Tensor& expert_ids, const at::Tensor& weights, int64_t experts);

// Token dropping under an expert capacity: each expert keeps at most C = ceil(capacity_factor * P / E)
// of the used (token, slot) pairs routed to it in this call (P of them in all: T * k for a top-k
// router; the scope is one micro-batch), those with the highest routing weight; the others ("lowest
// score first") get weight 0, so the token keeps only its residual path for that slot and the slot
// becomes unused. Sets routing.dropped_fraction and recounts tokens_per_expert. capacity_factor <= 0:
// dropless, no change.
void apply_expert_capacity(Routing& routing, double capacity_factor, int64_t num_experts);

// Router losses in use today, unscaled (multiply by the configured coefficient), in the compute dtype.
// `weights` [T, slots], where given, marks the unused slots (weight 0), which the counts f skip.
// Switch Transformer load balancing (arXiv:2101.03961): E * sum_e f_e * P_e, with f_e the fraction of
// used (token, slot) pairs on expert e and P_e the mean of probs[:, e]; 1 when perfectly balanced.
// probs [T, E], expert_ids [T, slots]. With `ranks` (data parallel) f counts the pairs of all ranks,
// summed before the loss is formed (the global-batch balance loss); P stays this rank's.
at::Tensor switch_balance_loss(const at::Tensor& probs, const at::Tensor& expert_ids, Communicator* ranks = nullptr,
                               const at::Tensor& weights = {});
// DeepSeek-V3's sequence-wise balance loss (arXiv:2412.19437, eq. 17-20): the same product per
// sequence, with P from the scores normalised per token (s / sum_j s_j), averaged over sequences.
// scores [T, E] (affinities >= 0), expert_ids [T, k], seq_len: tokens per sequence (T a multiple of it;
// 0 or a non-divisor: all T tokens form one sequence).
// With `context` (parallel.context) each sequence is split over its ranks: the counts f are summed over
// them and P stays this rank's, so the mean over the context ranks is the loss of the whole sequence.
at::Tensor sequence_balance_loss(const at::Tensor& scores, const at::Tensor& expert_ids, int64_t seq_len,
                                 Communicator* context = nullptr, const at::Tensor& weights = {});
// The same loss with f from given counts [E] (e.g. those of every micro-batch of a step on every rank,
// Router::set_step_counts): E * sum_e (counts_e / sum counts) * mean_t probs[t, e].
at::Tensor balance_loss_from_counts(const at::Tensor& probs, const at::Tensor& counts);
// Router z-loss (ST-MoE, arXiv:2202.08906, eq. 5): mean over tokens of logsumexp(logits_t)^2. logits [T, E].
at::Tensor router_z_loss(const at::Tensor& logits);

class Router {
 public:
  virtual ~Router() = default;
  // Routes `hidden` [tokens, hidden_size]. Called once per micro-batch per layer. While grad mode is
  // on (training) a router may record statistics it uses in after_optimizer_step().
  virtual Routing route(const at::Tensor& hidden) = 0;
  // Called by the schedule once after every optimizer step (e.g. the aux_free bias update).
  virtual void after_optimizer_step() {}
  // The global-batch balance loss wants the expert counts of the whole step (every micro-batch, every
  // rank) before any micro-batch's loss is formed. When this returns true and a step has several
  // micro-batches, the core first routes them all without gradients and passes the summed
  // tokens_per_expert [E] to set_step_counts() before the step, and an undefined tensor after it.
  virtual bool needs_step_counts() const { return false; }
  virtual void set_step_counts(const at::Tensor& /*tokens_per_expert*/) {}
  // The trained tensors (e.g. the gate projection [experts, hidden_size]).
  virtual std::vector<Parameter> parameters() = 0;
  // Untrained state saved with the model (e.g. a routing bias [experts]).
  virtual std::vector<NamedTensor> buffers() { return {}; }
  // True for a router whose tokens use a varying number of experts (unused slots of weight 0): `explain`
  // then counts active parameters with the mean active experts a run measured, not top_k.
  virtual bool variable_experts_per_token() const { return false; }
  // True when the weights' gradient is a surrogate by design (a straight-through estimator through a
  // hard choice, as top_any's): the conformance suite's central-difference check then covers aux_loss
  // and the weights' forward values, not their gradient.
  virtual bool straight_through() const { return false; }
};

}  // namespace pithtrain
