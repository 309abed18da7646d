// Descriptor of the schedule plugin `dualpipev` (behaviour in dualpipev.cpp).
#include "pithtrain/schedule.h"

namespace pithtrain {
std::unique_ptr<Schedule> make_dualpipev_schedule(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "schedule",
      .name = "dualpipev",
      .version = "1.0.0",
      .description = "V-shaped pipeline: two chunks per stage, paired forward/backward, weight gradients deferred into the bubbles",
      .torch_version = pithtrain::kTorchVersion,
      .make_schedule = &pithtrain::make_dualpipev_schedule,
  };
  return &descriptor;
}
