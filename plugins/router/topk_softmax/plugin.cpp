// Descriptor of the router plugin `topk_softmax` (behaviour in topk_softmax.cpp).
#include "pithtrain/router.h"

namespace pithtrain {
std::unique_ptr<Router> make_topk_softmax_router(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "router",
      .name = "topk_softmax",
      .version = "1.0.0",
      .description = "softmax over experts, top-k, optional renormalisation, Switch load-balancing loss",
      .torch_version = pithtrain::kTorchVersion,
      .make_router = &pithtrain::make_topk_softmax_router,
  };
  return &descriptor;
}
