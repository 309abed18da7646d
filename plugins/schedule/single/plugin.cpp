// Descriptor of the schedule plugin `single` (behaviour in single.cpp).
#include "pithtrain/schedule.h"

namespace pithtrain {
std::unique_ptr<Schedule> make_single_schedule(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "schedule",
      .name = "single",
      .version = "1.0.0",
      .description = "one process: gradient accumulation over micro-batches, then one optimizer step",
      .torch_version = pithtrain::kTorchVersion,
      .make_schedule = &pithtrain::make_single_schedule,
  };
  return &descriptor;
}
