// Interface of a `router` plugin: which experts each token goes to, with what weight, and its loss.
#pragma once
#include <vector>

#include "pithtrain/plugin.h"

namespace pithtrain {

// Dimension legend: tokens = batch * seq, k = top_k, experts = num_experts.
struct Routing {
  at::Tensor expert_ids;         // [tokens, k] int64, each in [0, experts)
  at::Tensor weights;            // [tokens, k] gate weights, differentiable, the hidden dtype
  at::Tensor aux_loss;           // [] the router's loss, already scaled by its coefficient (0 if none)
  at::Tensor tokens_per_expert;  // [experts] int64, how many (token, slot) pairs chose each expert
};

class Router {
 public:
  virtual ~Router() = default;
  // Routes `hidden` [tokens, hidden_size]. Called once per micro-batch per layer. While grad mode is
  // on (training) a router may record statistics it uses in after_optimizer_step().
  virtual Routing route(const at::Tensor& hidden) = 0;
  // Called by the schedule once after every optimizer step (e.g. the aux_free bias update).
  virtual void after_optimizer_step() {}
  // The trained tensors (e.g. the gate projection [experts, hidden_size]).
  virtual std::vector<Parameter> parameters() = 0;
  // Untrained state saved with the model (e.g. a routing bias [experts]).
  virtual std::vector<NamedTensor> buffers() { return {}; }
};

}  // namespace pithtrain
