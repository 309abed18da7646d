// Interface of an `experts` plugin: how routed tokens are laid out and computed (the expert layout).
#pragma once
#include <vector>

#include "pithtrain/plugin.h"
#include "pithtrain/router.h"

namespace pithtrain {

class Experts {
 public:
  virtual ~Experts() = default;
  // Runs every token through its chosen experts and combines them with the routing weights:
  // out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(hidden[t]).
  // hidden [tokens, hidden_size] -> [tokens, hidden_size].
  virtual at::Tensor forward(const at::Tensor& hidden, const Routing& routing) = 0;
  // Expert weights. Plugins that share a layout use the same names and shapes, so their weights are
  // interchangeable: gate_proj [experts, expert_hidden, hidden], up_proj [experts, expert_hidden,
  // hidden], down_proj [experts, hidden, expert_hidden].
  virtual std::vector<Parameter> parameters() = 0;
};

}  // namespace pithtrain
