// Descriptor of the attention plugin `gated_deltanet` (behaviour in gated_deltanet.cpp).
#include "pithtrain/attention.h"

namespace pithtrain {
std::unique_ptr<Attention> make_gated_deltanet_attention(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "attention",
      .name = "gated_deltanet",
      .version = "0.1.0",
      .description = "Gated DeltaNet linear attention (Qwen3-Next): short causal conv, gated delta rule in chunks, gated RMSNorm",
      .torch_version = pithtrain::kTorchVersion,
      .make_attention = &pithtrain::make_gated_deltanet_attention,
  };
  return &descriptor;
}
