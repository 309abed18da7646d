// Descriptor of the experts plugin `loop` (behaviour in loop.cpp).
#include "pithtrain/experts.h"

namespace pithtrain {
std::unique_ptr<Experts> make_loop_experts(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "experts",
      .name = "loop",
      .version = "1.0.0",
      .description = "reference expert layout: a loop over experts, each on the tokens that chose it",
      .torch_version = pithtrain::kTorchVersion,
      .make_experts = &pithtrain::make_loop_experts,
  };
  return &descriptor;
}
