// SingleDeviceSchedule: gradient accumulation on one device, then clip, step, post-step hooks.
#include <ATen/ATen.h>

#include "pithtrain/schedule.h"

namespace pithtrain {
namespace {

class SingleDeviceSchedule final : public Schedule {
 public:
  StepResult run_step(const StepFunctions& step) override {
    StepResult result;
    step.zero_grad();
    const double scale = 1.0 / static_cast<double>(step.micro_batches);
    for (int64_t index = 0; index < step.micro_batches; ++index) {
      MicroBatchLoss micro = step.forward(index);
      // Scaling each micro-batch's loss makes the summed gradients those of the mean loss.
      (micro.loss * scale).backward();
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
};

}  // namespace

std::unique_ptr<Schedule> make_single_schedule(Options&, const PluginContext&) {
  return std::make_unique<SingleDeviceSchedule>();
}

}  // namespace pithtrain
