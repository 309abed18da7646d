// Interface of a `schedule` plugin: how one optimizer step runs across micro-batches (and, later, devices).
#pragma once
#include <functional>

#include "pithtrain/plugin.h"

namespace pithtrain {

// The loss of one micro-batch as the core's model computes it.
struct MicroBatchLoss {
  at::Tensor loss;             // [] cross-entropy + router losses, with a graph to backpropagate
  double cross_entropy = 0;    // the language-model part, for logging
  double aux_loss = 0;         // the router part, for logging
  int64_t tokens = 0;          // target tokens in the micro-batch
};

// What the core hands a schedule for one optimizer step. Each function is called explicitly by the
// schedule; nothing runs behind its back.
struct StepFunctions {
  int64_t micro_batches = 1;
  // Runs the model forward on micro-batch `index` (0 <= index < micro_batches) and returns its loss.
  std::function<MicroBatchLoss(int64_t index)> forward;
  std::function<void()> zero_grad;
  // Clips the global gradient norm to the configured maximum; returns the norm before clipping.
  std::function<double()> clip_gradients;
  // Runs the optimizer plugin with this step's learning rate.
  std::function<void()> optimizer_step;
  // Runs every router's after_optimizer_step().
  std::function<void()> after_optimizer_step;
};

// Averages over the step's micro-batches.
struct StepResult {
  double loss = 0;
  double cross_entropy = 0;
  double aux_loss = 0;
  double grad_norm = 0;
  int64_t tokens = 0;
};

class Schedule {
 public:
  virtual ~Schedule() = default;
  // Runs one optimizer step: forward and backward of every micro-batch, clipping, the optimizer step,
  // the post-step hooks. Gradients must equal those of the mean loss over all micro-batches.
  virtual StepResult run_step(const StepFunctions& step) = 0;
  // True: the schedule itself averages the gradients of the trainable parameters not marked
  // expert_sharded over PluginContext::communicator before calling clip_gradients (e.g. overlapped
  // with the backward), and the core does not. False: the core does it inside clip_gradients.
  virtual bool reduces_gradients() const { return false; }
};

// The step of a gradient-accumulation schedule: zero_grad; forward and backward of each micro-batch
// with its loss scaled by 1 / micro_batches (so the summed gradients are those of the mean loss);
// clip; optimizer step; post-step hooks. The optional callbacks bracket the last micro-batch's backward.
inline StepResult accumulate_and_step(const StepFunctions& step, const std::function<void()>& before_last_backward = {},
                                      const std::function<void()>& after_last_backward = {}) {
  StepResult result;
  step.zero_grad();
  const double scale = 1.0 / static_cast<double>(step.micro_batches);
  for (int64_t index = 0; index < step.micro_batches; ++index) {
    MicroBatchLoss micro = step.forward(index);
    const bool last = index + 1 == step.micro_batches;
    if (last && before_last_backward) before_last_backward();
    micro.loss.mul(scale).backward();
    if (last && after_last_backward) after_last_backward();
    result.loss += micro.loss.item<double>() * scale;
    result.cross_entropy += micro.cross_entropy * scale;
    result.aux_loss += micro.aux_loss * scale;
    result.tokens += micro.tokens;
  }
  result.grad_norm = step.clip_gradients();
  step.optimizer_step();
  step.after_optimizer_step();
  return result;
}

}  // namespace pithtrain
