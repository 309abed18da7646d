// Interface of a `schedule` plugin: how one optimizer step runs across micro-batches (and, later, devices).
#pragma once
#include <functional>
#include <vector>

#include "pithtrain/plugin.h"

namespace pithtrain {

// The loss of one micro-batch as the core's model computes it.
struct MicroBatchLoss {
  at::Tensor loss;             // [] cross-entropy + router losses, with a graph to backpropagate
  double cross_entropy = 0;    // the language-model part, for logging
  double aux_loss = 0;         // the router part, for logging
  int64_t tokens = 0;          // target tokens in the micro-batch
};

// What one unit of the model chain returns (StepFunctions::forward_unit).
struct UnitOutput {
  // Units before the last: the hidden state [B, S, H] the next unit takes. The last unit: the
  // micro-batch's cross-entropy [].
  at::Tensor output;
  at::Tensor aux_loss;  // [] the unit's router loss (MoE layers); undefined elsewhere
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

  // The same model as a chain of units, for schedules that run it piece by piece (fully sharded,
  // pipeline): unit 0 is the embedding, units 1..L the decoder layers, unit L + 1 the final norm, the
  // LM head and the cross-entropy. The micro-batch's loss is the last unit's output plus every unit's
  // aux_loss, so its gradient is the backward of each unit with the gradient of its output from the
  // unit after it and 1 (times the micro-batch's weight) for its aux_loss.
  int64_t units = 0;
  // Runs unit `unit` on micro-batch `micro_batch`: `input` is the previous unit's output (undefined for
  // unit 0, which reads the micro-batch's tokens). With grad mode on it builds a graph and the core
  // counts the unit's routing statistics; with it off it only computes.
  std::function<UnitOutput(int64_t unit, int64_t micro_batch, const at::Tensor& input)> forward_unit;
  int64_t tokens_per_micro_batch = 0;  // target tokens of one micro-batch on this rank
  // Pipeline parallelism: the units this rank's stage runs, as chunks [first, end) in chain order,
  // Schedule::chunks_per_stage() of them: with one, the stage's consecutive units (every unit when
  // parallel.pipeline = 1); with two (V shape), chunk s and chunk 2P - 1 - s of the 2P. A unit's output
  // between stages has activation_shape and activation_dtype.
  std::vector<std::pair<int64_t, int64_t>> stage_chunks;
  std::vector<int64_t> activation_shape;  // [B, S, H]
  c10::ScalarType activation_dtype = c10::kFloat;
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
  // True: run_step runs only this rank's pipeline stage (StepFunctions::stage_chunks)
  // and exchanges activations over PluginContext::pipeline_group; needed when parallel.pipeline > 1.
  virtual bool runs_pipeline_stages() const { return false; }
  // Pipeline schedules: the chunks of the model chain each stage runs. 1: the chain is cut into P
  // consecutive pieces, stage s runs piece s. 2 (V shape): it is cut into 2P pieces and stage s runs
  // piece s and piece 2P - 1 - s, so stage 0 holds the embedding and the head.
  virtual int64_t chunks_per_stage() const { return 1; }

  // Fully sharded schedules. The core calls shard() once, before it makes the optimizer, with the
  // trainable parameters grouped by unit (StepFunctions::units). A schedule that shards returns one
  // shard per parameter, same name, in the layout below: the optimizer updates these, checkpoints hold
  // them gathered to full tensors, and the schedule owns the full tensors from then on (it may free
  // them between uses). Returning an empty vector (the default) leaves the parameters as they are.
  // Layout: the flattened full tensor padded with zeros to size * s elements, s = ceil(numel / size)
  // over PluginContext::communicator's size ranks; rank r's shard is elements [r * s, (r + 1) * s).
  virtual std::vector<Parameter> shard(const std::vector<std::vector<Parameter>>& /*parameters_by_unit*/) { return {}; }
  // Before the core runs a unit outside run_step (evaluation, the routing count pass) it calls
  // gather_unit(unit), and release_unit(unit) after; a sharded schedule restores and frees the unit's
  // full tensors there.
  virtual void gather_unit(int64_t /*unit*/) {}
  virtual void release_unit(int64_t /*unit*/) {}
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
