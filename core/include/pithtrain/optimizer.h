// Interface of an `optimizer` plugin: how parameters are updated from their gradients.
#pragma once
#include <vector>

#include "pithtrain/plugin.h"

namespace pithtrain {

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  // Updates PluginContext::parameters in place from their .grad() with learning rate `lr` (the core
  // owns the LR schedule). Parameters without a gradient are skipped.
  virtual void step(double lr) = 0;
  // The optimizer's state (moments, step counts) by name, for checkpoints. Loading copies into these
  // tensors, so they must exist from construction on.
  virtual std::vector<NamedTensor> state() = 0;
};

}  // namespace pithtrain
