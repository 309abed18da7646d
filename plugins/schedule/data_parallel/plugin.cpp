// Descriptor of the schedule plugin `data_parallel` (behaviour in data_parallel.cpp).
#include "pithtrain/schedule.h"

namespace pithtrain {
std::unique_ptr<Schedule> make_data_parallel_schedule(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "schedule",
      .name = "data_parallel",
      .version = "1.0.0",
      .description = "gradient accumulation; gradients all-reduced in buckets while the last backward runs",
      .torch_version = pithtrain::kTorchVersion,
      .make_schedule = &pithtrain::make_data_parallel_schedule,
  };
  return &descriptor;
}
