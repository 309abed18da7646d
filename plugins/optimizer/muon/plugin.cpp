// Descriptor of the optimizer plugin `muon` (behaviour in muon.cpp).
#include "pithtrain/optimizer.h"

namespace pithtrain {
std::unique_ptr<Optimizer> make_muon_optimizer(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "optimizer",
      .name = "muon",
      .version = "1.0.0",
      .description = "Muon (Newton-Schulz orthogonalised momentum, Moonlight scale) for matrices, AdamW for the rest",
      .torch_version = pithtrain::kTorchVersion,
      .make_optimizer = &pithtrain::make_muon_optimizer,
  };
  return &descriptor;
}
