// Descriptor of the schedule plugin `pipeline_1f1b` (behaviour in pipeline_1f1b.cpp).
#include "pithtrain/schedule.h"

namespace pithtrain {
std::unique_ptr<Schedule> make_pipeline_1f1b_schedule(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "schedule",
      .name = "pipeline_1f1b",
      .version = "1.0.0",
      .description = "pipeline stages, one-forward-one-backward over the micro-batches (point-to-point activations)",
      .torch_version = pithtrain::kTorchVersion,
      .make_schedule = &pithtrain::make_pipeline_1f1b_schedule,
  };
  return &descriptor;
}
