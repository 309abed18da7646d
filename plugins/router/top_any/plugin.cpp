// Descriptor of the router plugin `top_any` (behaviour in top_any.cpp).
#include "pithtrain/router.h"

namespace pithtrain {
std::unique_ptr<Router> make_top_any_router(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "router",
      .name = "top_any",
      .version = "1.0.0",
      .description = "DynMoE top-any gating: every expert whose sigmoid score passes its trainable threshold (at least one)",
      .torch_version = pithtrain::kTorchVersion,
      .make_router = &pithtrain::make_top_any_router,
  };
  return &descriptor;
}
