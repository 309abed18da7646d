// Per-layer attention: which attention table, and so which plugin and options, each decoder layer uses
// ([model] layer_types or full_attention_interval; docs/config.md "Per-layer attention").
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "registry.h"

namespace pithtrain {

// One layer type of the model and the layers that have it.
struct AttentionType {
  std::string name;            // "full_attention", "linear_attention", ... (as Hugging Face's layer_types)
  std::string table;           // its table under [model]: "attention" for full_attention, else the type's name
  Options options;             // that table: `plugin` and the plugin's own keys
  const LoadedPlugin* plugin;  // the attention plugin the table names
  std::vector<int64_t> layers;  // in increasing order
};

struct LayerTypes {
  std::vector<AttentionType> types;  // in order of first appearance
  std::vector<size_t> of_layer;      // [num_layers] index into types
};

// Reads `layer_types` (one type per layer) or `full_attention_interval` (every n-th layer full, the rest
// "linear_attention", as Qwen3-Next) from [model] and loads each type's plugin. Without either key every
// layer is "full_attention" with [model.attention], and nothing new is read (plain configs resolve as before).
LayerTypes read_layer_types(Options& model, PluginRegistry& registry, int64_t num_layers);

// Layer indices as ranges for the start-up manifest: {0, 1, 2, 4, 5, 6, 8} -> "0-2, 4-6, 8".
std::string describe_layers(const std::vector<int64_t>& layers);

}  // namespace pithtrain
