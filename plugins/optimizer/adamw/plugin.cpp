// Descriptor of the optimizer plugin `adamw` (behaviour in adamw.cpp).
#include "pithtrain/optimizer.h"

namespace pithtrain {
std::unique_ptr<Optimizer> make_adamw_optimizer(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "optimizer",
      .name = "adamw",
      .version = "1.0.0",
      .description = "AdamW: Adam with decoupled weight decay, none on norms and biases",
      .torch_version = pithtrain::kTorchVersion,
      .make_optimizer = &pithtrain::make_adamw_optimizer,
  };
  return &descriptor;
}
