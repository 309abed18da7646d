// Descriptor of the attention plugin `mla` (behaviour in mla.cpp).
#include "pithtrain/attention.h"

namespace pithtrain {
std::unique_ptr<Attention> make_mla_attention(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "attention",
      .name = "mla",
      .version = "1.0.0",
      .description = "Multi-head Latent Attention (DeepSeek-V2/V3): low-rank compressed KV, decoupled RoPE dimensions",
      .torch_version = pithtrain::kTorchVersion,
      .make_attention = &pithtrain::make_mla_attention,
  };
  return &descriptor;
}
