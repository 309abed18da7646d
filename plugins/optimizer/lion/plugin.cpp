// Descriptor of the optimizer plugin `lion` (behaviour in lion.cpp).
#include "pithtrain/optimizer.h"

namespace pithtrain {
std::unique_ptr<Optimizer> make_lion_optimizer(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "optimizer",
      .name = "lion",
      .version = "1.0.0",
      .description = "Lion (EvoLved Sign Momentum): sign of interpolated momentum, decoupled weight decay",
      .torch_version = pithtrain::kTorchVersion,
      .make_optimizer = &pithtrain::make_lion_optimizer,
  };
  return &descriptor;
}
