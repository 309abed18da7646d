// Moves tensors between Hugging Face MoE checkpoints and PithTrain's model state; what each architecture names
// them and how its config.json reads are in convert_architectures.cpp.
#include "convert.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>

#include <ATen/ATen.h>

#include "checkpoint.h"
#include "convert_architectures.h"
#include "json.h"
#include "model.h"
#include "pithtrain/error.h"
#include "pithtrain/nn.h"
#include "pithtrain/options.h"

namespace pithtrain {
namespace fs = std::filesystem;
using hf::Layout, hf::read_file, hf::layer_prefix, hf::our_layer_prefix, hf::fused_experts, hf::plain_names;

namespace {

// Qwen3.5 keeps the Gated DeltaNet input projections apart: in_proj_qkv rows [q of every key head | k | v of
// every value head], in_proj_z [the value heads' z], in_proj_b and in_proj_a [one row per value head].
// gated_deltanet groups them per key head i as Qwen3-Next does: q_i, k_i, then v and z of its r = nv / nk
// value heads; b_i then a_i. Row permutations, so both directions are exact.
at::Tensor group_qkvz(const at::Tensor& qkv, const at::Tensor& z, const Layout& layout) {
  const int64_t nk = layout.key_heads, dk = layout.key_dim, vz = layout.value_heads / nk * layout.value_dim, width = qkv.size(1);
  return at::cat({qkv.narrow(0, 0, nk * dk).view({nk, dk, width}), qkv.narrow(0, nk * dk, nk * dk).view({nk, dk, width}),
                  qkv.narrow(0, 2 * nk * dk, nk * vz).view({nk, vz, width}), z.view({nk, vz, width})}, 1)
      .reshape({-1, width});
}

std::pair<at::Tensor, at::Tensor> ungroup_qkvz(const at::Tensor& qkvz, const Layout& layout) {  // {in_proj_qkv, in_proj_z}
  const int64_t nk = layout.key_heads, dk = layout.key_dim, vz = layout.value_heads / nk * layout.value_dim, width = qkvz.size(1);
  std::vector<at::Tensor> parts = qkvz.view({nk, 2 * dk + 2 * vz, width}).split_with_sizes({dk, dk, vz, vz}, 1);
  return {at::cat({parts[0].reshape({-1, width}), parts[1].reshape({-1, width}), parts[2].reshape({-1, width})}),
          parts[3].reshape({-1, width})};
}

at::Tensor group_ba(const at::Tensor& b, const at::Tensor& a, const Layout& layout) {
  const int64_t nk = layout.key_heads, r = layout.value_heads / nk, width = b.size(1);
  return at::cat({b.view({nk, r, width}), a.view({nk, r, width})}, 1).reshape({-1, width});
}

std::pair<at::Tensor, at::Tensor> ungroup_ba(const at::Tensor& ba, const Layout& layout) {  // {in_proj_b, in_proj_a}
  const int64_t nk = layout.key_heads, r = layout.value_heads / nk, width = ba.size(1);
  std::vector<at::Tensor> parts = ba.view({nk, 2 * r, width}).split(r, 1);
  return {parts[0].reshape({-1, width}), parts[1].reshape({-1, width})};
}

void create_output_folder(const std::string& out_dir) {
  std::error_code error;
  fs::create_directories(out_dir, error);
  if (error || !fs::is_directory(out_dir))
    throw Error("--out " + out_dir + ": cannot create the folder (" + (error ? error.message() : "a file has that name") +
                "); pass a folder path");
}

// Writes PATH.tmp and renames it over PATH, so PATH is either the old file or the whole new one.
void write_text_file(const fs::path& path, const std::string& text) {
  const fs::path temporary = path.string() + ".tmp";
  {
    std::ofstream out(temporary, std::ios::trunc);
    out << text;
    if (!out.flush()) throw Error("cannot write '" + temporary.string() + "' (disk full or not writable?)");
  }
  fs::rename(temporary, path);
}

}  // namespace

void import_hf(const std::string& hf_dir, const std::string& out_dir) {
  const hf::ImportedConfig imported = hf::import_config(hf_dir, out_dir);
  const hf::Architecture& arch = *imported.arch;
  const hf::Layout& layout = imported.layout;
  const std::string& language_model_prefix = imported.language_model_prefix;
  const int64_t hidden = imported.hidden_size;
  const std::string& toml = imported.toml;

  // The shapes every tensor must have come from the model this config builds (on the meta device).
  Options options = Options::from_string(toml, (fs::path(out_dir) / "config.toml").string());
  PluginRegistry registry(default_search_dirs({}), {});
  PluginContext context;
  context.device = c10::Device(c10::kMeta);
  context.logger = &logger();
  Model model(options.table("model"), registry, context);
  std::map<std::string, std::vector<int64_t>> shape_of;
  for (const auto& item : model.state()) shape_of[item.name] = item.tensor.sizes().vec();

  // Tensors: one model.safetensors, or shards listed by model.safetensors.index.json. Each file's header is
  // read once (SafetensorsReader) and each tensor when it is converted, so memory holds a few tensors, never a
  // shard (docs/models.md).
  std::map<std::string, std::string> file_of;  // HF name -> shard path
  std::map<std::string, SafetensorsReader> shards;  // shard path -> its header, opened on first use
  auto open_shard = [&](const std::string& path) -> const SafetensorsReader& {
    try {
      return shards.emplace(path, SafetensorsReader(path)).first->second;
    } catch (const Error& error) {  // a damaged or cut-short download: say what to do
      const std::string what = error.what();
      if (what.ends_with("not a safetensors file")) throw Error(what + "; download it again");
      throw;
    }
  };
  const fs::path index = fs::path(hf_dir) / "model.safetensors.index.json";
  const bool sharded = fs::exists(index);
  if (sharded) {
    JsonValue map = parse_json(read_file(index), index.string());
    const JsonValue* weight_map = map.find("weight_map");
    if (weight_map == nullptr) throw Error(index.string() + ": missing 'weight_map'");
    for (const auto& [name, file] : weight_map->members) {
      file_of[name] = (fs::path(hf_dir) / file.text).string();
      if (!fs::is_regular_file(file_of[name]))
        throw Error(index.string() + ": lists shard '" + file.text + "' (tensor '" + name + "') but " + file_of[name] +
                    " does not exist; download every shard the index names");
    }
  } else {
    const std::string single = (fs::path(hf_dir) / "model.safetensors").string();
    if (!fs::exists(single))
      throw Error(hf_dir + ": has neither model.safetensors nor model.safetensors.index.json (with its shards); a Hugging Face "
                  "model folder holds its weights in one of them");
    for (const auto& tensor : open_shard(single).tensors()) file_of[tensor.name] = single;
  }
  // A Qwen3.5 vision-language folder: its language model's tensors go by the text model's names.
  std::map<std::string, std::string> stored_name;  // the text model's name -> the name in the file
  if (!language_model_prefix.empty()) {
    std::map<std::string, std::string> renamed;
    int64_t skipped_vision = 0;
    for (const auto& [name, file] : file_of) {
      if (name.rfind("model.visual.", 0) == 0) {
        ++skipped_vision;
        continue;
      }
      const bool prefixed = name.rfind(language_model_prefix, 0) == 0;
      const std::string ours = prefixed ? "model." + name.substr(language_model_prefix.size()) : name;
      stored_name[ours] = name, renamed[ours] = file;
    }
    file_of = std::move(renamed);
    logger().warn("{}: skipped the vision tower ({} model.visual.* tensors); the language model is imported", hf_dir,
                  skipped_vision);
  }
  std::set<std::string> used;
  // The tensors are converted twice: first on the meta device, which checks every name and shape against the
  // headers and gives each output's dtype and shape (the output's header comes first), then with the data,
  // each output written as soon as it is made.
  bool planning = true;
  // The file and header entry of `name`, checked against the shape the model needs.
  auto locate = [&](const std::string& name, at::IntArrayRef shape) -> std::pair<const SafetensorsReader*, const TensorEntry*> {
    auto found = file_of.find(name);
    if (found == file_of.end()) throw Error(hf_dir + ": tensor '" + name + "' is missing (no shard lists it)");
    auto opened = shards.find(found->second);
    const SafetensorsReader& shard = opened != shards.end() ? opened->second : open_shard(found->second);
    const TensorEntry* tensor = shard.find(stored_name.count(name) ? stored_name.at(name) : name);
    if (tensor == nullptr)
      throw Error(found->second + ": tensor '" + name + "' is missing" +
                  (sharded ? " (model.safetensors.index.json lists it in this shard: download the shard again)" : ""));
    if (at::IntArrayRef(tensor->shape) != shape)
      throw Error(found->second + ": tensor '" + name + "' has shape " + c10::str(at::IntArrayRef(tensor->shape)) +
                  ", config.json implies " + c10::str(shape));
    used.insert(name);
    return {&shard, tensor};
  };
  auto fetch = [&](const std::string& name, at::IntArrayRef shape) {
    auto [shard, tensor] = locate(name, shape);
    return planning ? at::empty(shape, at::TensorOptions().dtype(tensor->dtype).device(c10::kMeta)) : shard->read(*tensor);
  };
  // Tensors of one shape stacked into [N, ...] (one layer's experts), each read straight into its slice: the
  // stack is in memory once. Mixed dtypes are promoted, as at::stack would.
  auto fetch_stacked = [&](const std::vector<std::string>& names, at::IntArrayRef shape) {
    std::vector<std::pair<const SafetensorsReader*, const TensorEntry*>> parts;
    for (const auto& name : names) parts.push_back(locate(name, shape));
    at::ScalarType dtype = parts.front().second->dtype;
    for (const auto& part : parts) dtype = c10::promoteTypes(dtype, part.second->dtype);
    std::vector<int64_t> sizes = shape.vec();
    sizes.insert(sizes.begin(), static_cast<int64_t>(names.size()));
    if (planning) return at::empty(sizes, at::TensorOptions().dtype(dtype).device(c10::kMeta));
    at::Tensor stacked = at::empty(sizes, at::TensorOptions().dtype(dtype));  // [N, ...]
    for (size_t i = 0; i < parts.size(); ++i) {
      if (parts[i].second->dtype == dtype) parts[i].first->read_into(*parts[i].second, stacked[i]);
      else stacked[i].copy_(parts[i].first->read(*parts[i].second));
    }
    return stacked;
  };
  std::vector<TensorEntry> planned;  // the output's tensors, in file order
  std::optional<SafetensorsWriter> writer;
  struct Output {  // where the conversion below puts each PithTrain tensor: the plan, then the file
    std::vector<TensorEntry>& planned;
    std::optional<SafetensorsWriter>& writer;
    void push_back(const NamedTensor& item) {
      if (writer) writer->write(item.name, item.tensor);
      else planned.push_back({item.name, item.tensor.scalar_type(), item.tensor.sizes().vec()});
    }
  } tensors{planned, writer};
  auto convert = [&] {
    for (const auto& [ours, theirs] : plain_names(layout, arch)) tensors.push_back({ours, fetch(theirs, shape_of.at(ours))});
    for (int64_t layer = 0; arch.split_linear_projections && layer < layout.layers; ++layer) {
      if (!layout.linear[layer]) continue;
      const std::string base = layer_prefix(layer) + "linear_attn.", ours = "layers." + std::to_string(layer) + ".linear_attention.";
      const int64_t key_rows = layout.key_heads * layout.key_dim, value_rows = layout.value_heads * layout.value_dim;
      tensors.push_back({ours + "in_proj_qkvz", group_qkvz(fetch(base + "in_proj_qkv.weight", {2 * key_rows + value_rows, hidden}),
                                                           fetch(base + "in_proj_z.weight", {value_rows, hidden}), layout)});
      tensors.push_back({ours + "in_proj_ba", group_ba(fetch(base + "in_proj_b.weight", {layout.value_heads, hidden}),
                                                       fetch(base + "in_proj_a.weight", {layout.value_heads, hidden}), layout)});
    }
    for (int64_t layer = layout.first_dense; layer < layout.layers + layout.mtp_layers; ++layer) {
      if (!fused_experts(arch)) {
        const std::string base = layer_prefix(layer) + arch.moe_module + ".experts.";
        for (auto [ours, theirs] : {std::pair{"gate_proj", arch.gate_name}, {"up_proj", arch.up_name}, {"down_proj", arch.down_name}}) {
          const std::string our_name = our_layer_prefix(layer, layout) + "experts." + ours;
          std::vector<int64_t> shape(shape_of.at(our_name).begin() + 1, shape_of.at(our_name).end());
          std::vector<std::string> per_expert;
          for (int64_t expert = 0; expert < layout.experts; ++expert)
            per_expert.push_back(base + std::to_string(expert) + "." + theirs + ".weight");
          tensors.push_back({our_name, fetch_stacked(per_expert, shape)});  // [E, ...]
        }
        continue;
      }
      const std::string base = layer_prefix(layer) + "mlp.experts.", ours = "layers." + std::to_string(layer) + ".experts.";
      const std::vector<int64_t>& gate = shape_of.at(ours + "gate_proj");  // [E, F, H]
      const int64_t experts = gate[0], inner = gate[1], width = gate[2];
      at::Tensor gate_up = fetch(base + "gate_up_proj", {experts, width, 2 * inner});     // [E, H, 2F]
      at::Tensor gate_up_bias = fetch(base + "gate_up_proj_bias", {experts, 2 * inner});  // [E, 2F]
      tensors.push_back({ours + "gate_proj", gate_up.slice(2, 0, 2 * inner, 2).transpose(1, 2).contiguous()});
      tensors.push_back({ours + "up_proj", gate_up.slice(2, 1, 2 * inner, 2).transpose(1, 2).contiguous()});
      tensors.push_back({ours + "down_proj", fetch(base + "down_proj", {experts, inner, width}).transpose(1, 2).contiguous()});
      tensors.push_back({ours + "gate_bias", gate_up_bias.slice(1, 0, 2 * inner, 2).contiguous()});
      tensors.push_back({ours + "up_bias", gate_up_bias.slice(1, 1, 2 * inner, 2).contiguous()});
      tensors.push_back({ours + "down_bias", fetch(base + "down_proj_bias", {experts, width})});
    }
    // An MTP depth's embed_tokens and shared_head.head are copies of the shared embedding and LM head: read if
    // present (so the file round-trips), trained as the one shared tensor.
    for (int64_t depth = 0; depth < layout.mtp_layers; ++depth)
      for (auto [copy, main_name] : {std::pair{"embed_tokens.weight", "model.embed_tokens.weight"}, {"shared_head.head.weight", "lm_head.weight"}}) {
        const std::string name = layer_prefix(layout.layers + depth) + copy;
        if (!file_of.count(name)) continue;
        const std::string ours = main_name == std::string("lm_head.weight") ? "lm_head.weight" : "embedding.weight";
        const at::Tensor copied = fetch(name, shape_of.at(ours)), main = fetch(main_name, shape_of.at(ours));
        if (!planning && !at::equal(copied, main))
          logger().warn("{}: '{}' differs from the main model's copy; multi-token prediction shares the main one ({})", hf_dir,
                        name, main_name);
      }
  };
  convert();  // the plan: every name and shape checked against the headers, no data read
  int64_t skipped_mtp = 0;
  for (const auto& [name, file] : file_of) {
    if (hf::is_mtp_tensor(imported, name)) {  // multi-token prediction: not part of the model (warned on reading config.json)
      skipped_mtp += !used.count(name);
      continue;
    }
    if (!used.count(name) && name.find("rotary_emb.inv_freq") == std::string::npos)
      throw Error(file + ": tensor '" + name + "' has no place in a PithTrain " + arch.model_type +
                  " model (an unsupported feature of this checkpoint)");
  }
  if (skipped_mtp > 0) logger().warn("{}: skipped {} multi-token prediction tensors", hf_dir, skipped_mtp);
  // Written only now that every tensor is found and checked: a failed import leaves DIR as it was.
  create_output_folder(out_dir);
  writer.emplace((fs::path(out_dir) / "model.safetensors").string(), planned, std::map<std::string, std::string>{{"source", hf_dir}});
  planning = false;
  convert();  // the data: each tensor read, converted and written, then freed
  writer->commit();
  write_text_file(fs::path(out_dir) / "config.toml", toml);
}

void export_hf(const std::string& config_path, const std::string& weights, const std::string& out_dir) {
  // config.json is composed first (it reads required keys that may be missing): a failed export writes nothing.
  const hf::ExportedConfig exported = hf::export_config(config_path);
  const hf::Architecture& arch = *exported.arch;
  const hf::Layout& layout = exported.layout;
  const int64_t layers = layout.layers, experts = layout.experts;
  SafetensorsFile source = load_safetensors(weights);
  // Checkpoints prefix model tensors with "model/"; model.safetensors files do not.
  const std::string prefix = source.find("embedding.weight") ? "" : "model/";
  auto get = [&](const std::string& name) {
    const at::Tensor* tensor = source.find(prefix + name);
    if (tensor == nullptr) throw Error(weights + ": tensor '" + prefix + name + "' is missing");
    return *tensor;
  };
  std::vector<NamedTensor> tensors;
  for (const auto& [ours, theirs] : plain_names(layout, arch)) tensors.push_back({theirs, get(ours)});
  for (int64_t layer = 0; arch.split_linear_projections && layer < layers; ++layer) {
    if (!layout.linear[layer]) continue;
    const std::string ours = "layers." + std::to_string(layer) + ".linear_attention.", base = layer_prefix(layer) + "linear_attn.";
    auto [qkv, z] = ungroup_qkvz(get(ours + "in_proj_qkvz"), layout);
    auto [b, a] = ungroup_ba(get(ours + "in_proj_ba"), layout);
    tensors.insert(tensors.end(), {{base + "in_proj_qkv.weight", qkv}, {base + "in_proj_z.weight", z},
                                   {base + "in_proj_b.weight", b}, {base + "in_proj_a.weight", a}});
  }
  for (int64_t depth = 0; depth < layout.mtp_layers; ++depth) {  // the Hugging Face layout keeps copies of the shared tensors
    tensors.push_back({layer_prefix(layers + depth) + "embed_tokens.weight", get("embedding.weight")});
    tensors.push_back({layer_prefix(layers + depth) + "shared_head.head.weight", get("lm_head.weight")});
  }
  for (int64_t layer = layout.first_dense; layer < layers + layout.mtp_layers; ++layer) {
    const std::string ours = our_layer_prefix(layer, layout) + "experts.";
    if (!fused_experts(arch)) {  // one tensor per expert and projection
      for (auto [our_name, theirs] : {std::pair{"gate_proj", arch.gate_name}, {"up_proj", arch.up_name}, {"down_proj", arch.down_name}}) {
        at::Tensor stacked = get(ours + our_name);
        for (int64_t expert = 0; expert < experts; ++expert)
          tensors.push_back({layer_prefix(layer) + arch.moe_module + ".experts." + std::to_string(expert) + "." + theirs + ".weight",
                             stacked[expert].clone()});
      }
      continue;
    }
    const std::string base = layer_prefix(layer) + "mlp.experts.";
    at::Tensor gate = get(ours + "gate_proj").transpose(1, 2), up = get(ours + "up_proj").transpose(1, 2);  // [E, H, F]
    tensors.push_back({base + "gate_up_proj", at::stack({gate, up}, -1).flatten(-2)});                   // [E, H, 2F], interleaved
    tensors.push_back({base + "gate_up_proj_bias", at::stack({get(ours + "gate_bias"), get(ours + "up_bias")}, -1).flatten(-2)});
    tensors.push_back({base + "down_proj", get(ours + "down_proj").transpose(1, 2).contiguous()});  // [E, F, H]
    tensors.push_back({base + "down_proj_bias", get(ours + "down_bias")});
  }
  std::sort(tensors.begin(), tensors.end(), [](const auto& a, const auto& b) { return a.name < b.name; });

  create_output_folder(out_dir);
  save_safetensors((fs::path(out_dir) / "model.safetensors").string(), tensors, {{"format", "pt"}});
  write_text_file(fs::path(out_dir) / "config.json", exported.json);
}

}  // namespace pithtrain
