// SingleDeviceSchedule: gradient accumulation on one device, then clip, step, post-step hooks.
#include <ATen/ATen.h>

#include "pithtrain/schedule.h"

namespace pithtrain {
namespace {

class SingleDeviceSchedule final : public Schedule {
 public:
  StepResult run_step(const StepFunctions& step) override { return accumulate_and_step(step); }
};

}  // namespace

std::unique_ptr<Schedule> make_single_schedule(Options&, const PluginContext&) {
  return std::make_unique<SingleDeviceSchedule>();
}

}  // namespace pithtrain
