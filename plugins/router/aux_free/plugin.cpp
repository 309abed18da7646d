// Descriptor of the router plugin `aux_free` (behaviour in aux_free.cpp).
#include "pithtrain/router.h"

namespace pithtrain {
std::unique_ptr<Router> make_aux_free_router(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "router",
      .name = "aux_free",
      .version = "1.0.0",
      .description = "DeepSeek-V3 auxiliary-loss-free balancing: sigmoid scores, per-expert bias for the top-k choice",
      .torch_version = pithtrain::kTorchVersion,
      .make_router = &pithtrain::make_aux_free_router,
  };
  return &descriptor;
}
