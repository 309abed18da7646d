// Per-layer attention (layer_types.h): one type name per decoder layer, each type's table and plugin.
#include "layer_types.h"

#include <algorithm>
#include <cctype>

namespace pithtrain {

namespace {

// A type names a table under [model], so it must be a plain lowercase name that no other [model] table
// takes: "attention" is spelled "full_attention" here, and "moe" is the experts' table.
void check_type_name(const Options& model, const std::string& type, size_t layer) {
  auto lower_or_digit = [](char c) {
    return std::islower(static_cast<unsigned char>(c)) || std::isdigit(static_cast<unsigned char>(c)) || c == '_';
  };
  const bool plain = !type.empty() && std::islower(static_cast<unsigned char>(type[0])) &&
                     std::all_of(type.begin(), type.end(), lower_or_digit);
  const char* problem = !plain               ? "is not a lowercase name (letters, digits, '_')"
                        : type == "attention" ? "is spelled \"full_attention\" here (its table is [model.attention])"
                        : type == "moe"       ? "names the experts' table [model.moe], not an attention table"
                                              : nullptr;
  if (problem != nullptr)
    throw Error(model.where("layer_types") + ": model.layer_types[" + std::to_string(layer) + "] = \"" + type + "\" " + problem);
}

}  // namespace

LayerTypes read_layer_types(Options& model, PluginRegistry& registry, int64_t num_layers) {
  std::vector<std::string> names(num_layers, "full_attention");
  if (model.has("layer_types") && model.has("full_attention_interval"))
    throw Error(model.where("full_attention_interval") + ": give model.layer_types or model.full_attention_interval, not both");
  if (model.has("layer_types")) {
    names = model.text_list("layer_types", {});
    if (static_cast<int64_t>(names.size()) != num_layers)
      throw Error(model.where("layer_types") + ": model.layer_types has " + std::to_string(names.size()) +
                  " entries but model.num_layers = " + std::to_string(num_layers) + "; give one type per layer");
  } else if (model.has("full_attention_interval")) {
    // Qwen3-Next: layer i is full attention when (i + 1) is a multiple of the interval.
    const int64_t interval = model.integer("full_attention_interval", 4, Range::closed(1, static_cast<double>(num_layers)));
    for (int64_t layer = 0; layer < num_layers; ++layer)
      names[layer] = (layer + 1) % interval == 0 ? "full_attention" : "linear_attention";
  }

  LayerTypes result;
  for (size_t layer = 0; layer < names.size(); ++layer) {
    const std::string& name = names[layer];
    auto found = std::find_if(result.types.begin(), result.types.end(), [&](const AttentionType& type) { return type.name == name; });
    if (found == result.types.end()) {
      check_type_name(model, name, layer);
      const bool full = name == "full_attention";
      AttentionType type{name, full ? "attention" : name, model.table(full ? "attention" : name), nullptr, {}};
      // [model.attention] keeps its default plugin; another type's table must exist and name its plugin.
      if (!full && !model.has(name))
        throw Error(model.where(model.has("layer_types") ? "layer_types" : "full_attention_interval") + ": layer type \"" + name +
                    "\" has no table: add [model." + name + "] with plugin = \"...\" (e.g. \"gated_deltanet\") and its options");
      const std::string plugin = full ? type.options.text("plugin", "gqa") : type.options.required_text("plugin");
      type.plugin = &registry.get("attention", plugin, type.options.where("plugin"));
      result.types.push_back(std::move(type));
      found = result.types.end() - 1;
    }
    found->layers.push_back(static_cast<int64_t>(layer));
    result.of_layer.push_back(static_cast<size_t>(found - result.types.begin()));
  }
  return result;
}

std::string describe_layers(const std::vector<int64_t>& layers) {
  std::string text;
  for (size_t start = 0; start < layers.size();) {
    size_t end = start;
    while (end + 1 < layers.size() && layers[end + 1] == layers[end] + 1) ++end;
    if (!text.empty()) text += ", ";
    text += std::to_string(layers[start]);
    if (end > start) text.append(1, '-').append(std::to_string(layers[end]));
    start = end + 1;
  }
  return text;
}

}  // namespace pithtrain
