// Descriptor of the schedule plugin `fully_sharded` (behaviour in fully_sharded.cpp).
#include "pithtrain/schedule.h"

namespace pithtrain {
std::unique_ptr<Schedule> make_fully_sharded_schedule(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "schedule",
      .name = "fully_sharded",
      .version = "1.0.0",
      .description = "ZeRO-3: parameters, gradients and optimizer state sharded over the ranks, gathered per layer",
      .torch_version = pithtrain::kTorchVersion,
      .make_schedule = &pithtrain::make_fully_sharded_schedule,
  };
  return &descriptor;
}
