// Descriptor of the router plugin `remoe` (behaviour in remoe.cpp).
#include "pithtrain/router.h"

namespace pithtrain {
std::unique_ptr<Router> make_remoe_router(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "router",
      .name = "remoe",
      .version = "1.0.0",
      .description = "ReMoE ReLU routing: every expert with a positive gate, sparsity held at 1 - top_k/E by an adaptive L1 penalty",
      .torch_version = pithtrain::kTorchVersion,
      .make_router = &pithtrain::make_remoe_router,
  };
  return &descriptor;
}
