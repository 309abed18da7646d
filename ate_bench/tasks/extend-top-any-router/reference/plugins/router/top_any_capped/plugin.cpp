// Descriptor of the router plugin `top_any_capped` (behaviour in top_any_capped.cpp).
#include "pithtrain/router.h"

namespace pithtrain {
std::unique_ptr<Router> make_top_any_capped_router(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "router",
      .name = "top_any_capped",
      .version = "1.0.0",
      .description = "DynMoE-style top-any gating: each token takes every expert whose cosine score beats its trained threshold",
      .torch_version = pithtrain::kTorchVersion,
      .make_router = &pithtrain::make_top_any_capped_router,
  };
  return &descriptor;
}
