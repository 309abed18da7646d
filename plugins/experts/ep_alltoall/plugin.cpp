// Descriptor of the experts plugin `ep_alltoall` (behaviour in ep_alltoall.cpp).
#include "pithtrain/experts.h"

namespace pithtrain {
std::unique_ptr<Experts> make_ep_alltoall_experts(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "experts",
      .name = "ep_alltoall",
      .version = "1.0.0",
      .description = "expert parallel: experts split over the expert group, tokens sent to their expert's rank by all-to-all",
      .torch_version = pithtrain::kTorchVersion,
      .make_experts = &pithtrain::make_ep_alltoall_experts,
  };
  return &descriptor;
}
