// Descriptor of the optimizer plugin `sgd_nesterov` (behaviour in sgd_nesterov.cpp).
#include "pithtrain/optimizer.h"

namespace pithtrain {
std::unique_ptr<Optimizer> make_sgd_nesterov_optimizer(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "optimizer",
      .name = "sgd_nesterov",
      .version = "1.0.0",
      .description = "SGD with Nesterov momentum and coupled (L2) weight decay",
      .torch_version = pithtrain::kTorchVersion,
      .make_optimizer = &pithtrain::make_sgd_nesterov_optimizer,
  };
  return &descriptor;
}
