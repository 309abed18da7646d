// Descriptor of the attention plugin `gqa` (behaviour in gqa.cpp).
#include "pithtrain/attention.h"

namespace pithtrain {
std::unique_ptr<Attention> make_gqa_attention(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "attention",
      .name = "gqa",
      .version = "1.0.0",
      .description = "multi-head / grouped-query causal attention with RoPE, via scaled-dot-product attention",
      .torch_version = pithtrain::kTorchVersion,
      .make_attention = &pithtrain::make_gqa_attention,
  };
  return &descriptor;
}
