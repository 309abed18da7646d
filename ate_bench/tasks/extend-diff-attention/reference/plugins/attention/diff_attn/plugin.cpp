// Descriptor of the attention plugin `diff_attn` (behaviour in diff_attn.cpp).
#include "pithtrain/attention.h"

namespace pithtrain {
std::unique_ptr<Attention> make_diff_attn_attention(Options& options, const PluginContext& context);
}

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "attention",
      .name = "diff_attn",
      .version = "1.0.0",
      .description = "Differential Transformer attention: the difference of two softmax maps with a learned lambda",
      .torch_version = pithtrain::kTorchVersion,
      .make_attention = &pithtrain::make_diff_attn_attention,
  };
  return &descriptor;
}
