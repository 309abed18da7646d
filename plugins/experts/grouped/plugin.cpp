// Descriptor of the experts plugin `grouped` (behaviour in grouped.cpp).
#include "pithtrain/experts.h"

namespace pithtrain {
std::unique_ptr<Experts> make_grouped_experts(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "experts",
      .name = "grouped",
      .version = "1.0.0",
      .description = "tokens sorted by expert, each expert on its contiguous slice, scattered back",
      .torch_version = pithtrain::kTorchVersion,
      .make_experts = &pithtrain::make_grouped_experts,
  };
  return &descriptor;
}
