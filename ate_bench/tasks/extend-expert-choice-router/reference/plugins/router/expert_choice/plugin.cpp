// Descriptor of the router plugin `expert_choice` (behaviour in expert_choice.cpp).
#include "pithtrain/router.h"

namespace pithtrain {
std::unique_ptr<Router> make_expert_choice_router(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "router",
      .name = "expert_choice",
      .version = "1.0.0",
      .description = "expert-choice routing: each expert takes its top tokens up to a capacity",
      .torch_version = pithtrain::kTorchVersion,
      .make_router = &pithtrain::make_expert_choice_router,
  };
  return &descriptor;
}
