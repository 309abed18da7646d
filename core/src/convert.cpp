// Name and layout mapping between Hugging Face MoE checkpoints and PithTrain's model state.
#include "convert.h"

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <ATen/ATen.h>

#include "checkpoint.h"
#include "json.h"
#include "pithtrain/error.h"
#include "pithtrain/options.h"

namespace pithtrain {
namespace fs = std::filesystem;

namespace {

// What differs between the supported architectures.
struct Architecture {
  std::string model_type, hf_class;
  std::string moe_module;                    // "mlp" or "block_sparse_moe"
  std::string gate_name, up_name, down_name; // per-expert projection names
  std::string experts_key, expert_size_key;  // config.json keys
  std::string qk_norm;                       // "none", "head", "full"
  bool always_renormalize;                   // Mixtral renormalises the top-k weights unconditionally
};

const std::vector<Architecture> kArchitectures = {
    {"qwen3_moe", "Qwen3MoeForCausalLM", "mlp", "gate_proj", "up_proj", "down_proj", "num_experts", "moe_intermediate_size", "head", false},
    {"mixtral", "MixtralForCausalLM", "block_sparse_moe", "w1", "w3", "w2", "num_local_experts", "intermediate_size", "none", true},
    {"olmoe", "OlmoeForCausalLM", "mlp", "gate_proj", "up_proj", "down_proj", "num_experts", "intermediate_size", "full", false},
};

const Architecture& architecture(const std::string& model_type, const std::string& where) {
  for (const auto& candidate : kArchitectures)
    if (candidate.model_type == model_type) return candidate;
  std::string known;
  for (const auto& candidate : kArchitectures) known += (known.empty() ? "" : ", ") + candidate.model_type;
  throw Error(where + ": model_type '" + model_type + "' is not supported by pithtrain convert (supported: " + known +
              "; DeepSeek-V2/V3 and GPT-OSS need attention plugins that do not exist yet)");
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path);
  if (!in) throw Error("cannot read '" + path.string() + "'");
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

double number(const JsonValue& config, const std::string& key, const std::string& file, std::optional<double> fallback = {}) {
  const JsonValue* value = config.find(key);
  if (value == nullptr || value->type == JsonValue::Type::Null) {
    if (fallback) return *fallback;
    throw Error(file + ": missing '" + key + "'");
  }
  if (value->type == JsonValue::Type::Bool) return value->boolean ? 1.0 : 0.0;
  if (value->type != JsonValue::Type::Number) throw Error(file + ": '" + key + "' must be a number");
  return value->number;
}

std::string layer_prefix(int64_t layer) { return "model.layers." + std::to_string(layer) + "."; }

// (PithTrain name, Hugging Face name) of every non-expert tensor.
std::vector<std::pair<std::string, std::string>> plain_names(int64_t layers, const Architecture& arch) {
  std::vector<std::pair<std::string, std::string>> names = {{"embedding.weight", "model.embed_tokens.weight"},
                                                            {"final_norm.weight", "model.norm.weight"},
                                                            {"lm_head.weight", "lm_head.weight"}};
  for (int64_t layer = 0; layer < layers; ++layer) {
    const std::string ours = "layers." + std::to_string(layer) + ".", theirs = layer_prefix(layer);
    names.push_back({ours + "attention_norm.weight", theirs + "input_layernorm.weight"});
    names.push_back({ours + "ffn_norm.weight", theirs + "post_attention_layernorm.weight"});
    for (const char* projection : {"q_proj", "k_proj", "v_proj", "o_proj"})
      names.push_back({ours + "attention." + projection, theirs + "self_attn." + projection + ".weight"});
    if (arch.qk_norm != "none") {
      names.push_back({ours + "attention.q_norm", theirs + "self_attn.q_norm.weight"});
      names.push_back({ours + "attention.k_norm", theirs + "self_attn.k_norm.weight"});
    }
    names.push_back({ours + "router.gate.weight", theirs + arch.moe_module + ".gate.weight"});
  }
  return names;
}

std::string toml_number(double value) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%.17g", value);
  std::string text = buffer;
  if (text.find_first_of(".e") == std::string::npos) text += ".0";
  return text;
}

}  // namespace

void import_hf(const std::string& hf_dir, const std::string& out_dir) {
  const fs::path config_path = fs::path(hf_dir) / "config.json";
  const std::string config_file = config_path.string();
  JsonValue config = parse_json(read_file(config_path), config_file);
  const JsonValue* model_type = config.find("model_type");
  if (model_type == nullptr) throw Error(config_file + ": missing 'model_type'");
  const Architecture& arch = architecture(model_type->text, config_file);

  auto integer = [&](const std::string& key, std::optional<double> fallback = {}) {
    return static_cast<int64_t>(number(config, key, config_file, fallback));
  };
  const int64_t layers = integer("num_hidden_layers"), hidden = integer("hidden_size"), heads = integer("num_attention_heads");
  // Hub files name the expert count num_experts (Qwen3, OLMoE) or num_local_experts (Mixtral); newer
  // transformers versions write num_local_experts for all three.
  const int64_t experts = config.find(arch.experts_key) ? integer(arch.experts_key) : integer("num_local_experts");
  const int64_t top_k = integer("num_experts_per_tok");
  const int64_t head_dim = integer("head_dim", static_cast<double>(hidden / heads));
  double rope_theta = number(config, "rope_theta", config_file, 10000.0);
  if (const JsonValue* rope = config.find("rope_parameters")) {
    if (const JsonValue* type = rope->find("rope_type"); type && type->text != "default")
      throw Error(config_file + ": rope_type '" + type->text + "' is not supported (only default RoPE)");
    rope_theta = number(*rope, "rope_theta", config_file, rope_theta);
  }
  if (number(config, "tie_word_embeddings", config_file, 0.0) != 0.0)
    throw Error(config_file + ": tie_word_embeddings = true is not supported (PithTrain keeps a separate LM head)");
  if (number(config, "attention_bias", config_file, 0.0) != 0.0)
    throw Error(config_file + ": attention_bias = true is not supported by the gqa plugin");
  if (const JsonValue* window = config.find("sliding_window"); window && window->type == JsonValue::Type::Number &&
                                                                  number(config, "use_sliding_window", config_file, 1.0) != 0.0)
    throw Error(config_file + ": sliding-window attention is not supported yet");
  if (const JsonValue* dense = config.find("mlp_only_layers"); dense && !dense->items.empty())
    throw Error(config_file + ": mlp_only_layers is not supported (dense layers must come first: first_dense_layers)");
  if (integer("decoder_sparse_step", 1.0) != 1) throw Error(config_file + ": decoder_sparse_step != 1 is not supported");
  if (const JsonValue* clip = config.find("clip_qkv"); clip && clip->type == JsonValue::Type::Number)
    throw Error(config_file + ": clip_qkv is not supported");
  const double eps = number(config, "rms_norm_eps", config_file, 1e-6);
  const bool renormalize = arch.always_renormalize || number(config, "norm_topk_prob", config_file, 0.0) != 0.0;

  fs::create_directories(out_dir);
  std::ofstream toml(fs::path(out_dir) / "config.toml");
  toml << "# Imported by `pithtrain convert import " << hf_dir << "` (" << arch.hf_class << ").\n\n"
       << "[run]\nname = \"" << fs::path(out_dir).filename().string() << "\"\n\n"
       << "[data]\npath = \"data/fortunes.tokens\"   # replace with data tokenized for this model's vocabulary\n\n"
       << "[model]\nhf_architecture = \"" << arch.model_type << "\"\nvocab_size = " << integer("vocab_size")
       << "\nhidden_size = " << hidden << "\nnum_layers = " << layers << "\nnum_heads = " << heads
       << "\nnum_kv_heads = " << integer("num_key_value_heads", static_cast<double>(heads)) << "\nhead_dim = " << head_dim
       << "\nrope_theta = " << toml_number(rope_theta) << "\nnorm_eps = " << toml_number(eps)
       << "\ninit_std = " << toml_number(number(config, "initializer_range", config_file, 0.02))
       << "\n\n[model.attention]\nplugin = \"gqa\"\nqk_norm = \"" << arch.qk_norm << "\"\nqk_norm_eps = " << toml_number(eps)
       << "\n\n[model.moe]\nnum_experts = " << experts << "\ntop_k = " << top_k
       << "\nexpert_hidden_size = " << integer(arch.expert_size_key) << "\nshared_experts = 0\n\n"
       << "[model.moe.router]\nplugin = \"topk_softmax\"\nrenormalize = " << (renormalize ? "true" : "false")
       << "\naux_loss_coeff = " << toml_number(number(config, "router_aux_loss_coef", config_file, 0.01))
       << "\n\n[model.moe.experts]\nplugin = \"grouped\"\n";

  // Tensors: one model.safetensors, or shards listed by model.safetensors.index.json.
  std::map<std::string, std::string> file_of;  // HF name -> shard path
  std::map<std::string, SafetensorsFile> shards;
  const fs::path index = fs::path(hf_dir) / "model.safetensors.index.json";
  if (fs::exists(index)) {
    JsonValue map = parse_json(read_file(index), index.string());
    const JsonValue* weight_map = map.find("weight_map");
    if (weight_map == nullptr) throw Error(index.string() + ": missing 'weight_map'");
    for (const auto& [name, file] : weight_map->members) file_of[name] = (fs::path(hf_dir) / file.text).string();
  } else {
    const std::string single = (fs::path(hf_dir) / "model.safetensors").string();
    for (const auto& tensor : load_safetensors(single).tensors) file_of[tensor.name] = single;
  }
  std::set<std::string> used;
  auto fetch = [&](const std::string& name, at::IntArrayRef shape) {
    auto found = file_of.find(name);
    if (found == file_of.end()) throw Error(hf_dir + ": tensor '" + name + "' is missing (no shard lists it)");
    if (!shards.count(found->second)) shards.emplace(found->second, load_safetensors(found->second));
    const at::Tensor* tensor = shards.at(found->second).find(name);
    if (tensor == nullptr) throw Error(found->second + ": tensor '" + name + "' is missing");
    if (tensor->sizes() != shape)
      throw Error(found->second + ": tensor '" + name + "' has shape " + c10::str(tensor->sizes()) + ", config.json implies " +
                  c10::str(shape));
    used.insert(name);
    return *tensor;
  };
  const int64_t vocab = integer("vocab_size"), kv = integer("num_key_value_heads", static_cast<double>(heads));
  const int64_t inner = integer(arch.expert_size_key);
  auto shape_of = [&](const std::string& ours) -> std::vector<int64_t> {
    auto ends = [&](const std::string& suffix) { return ours.size() >= suffix.size() && ours.compare(ours.size() - suffix.size(), suffix.size(), suffix) == 0; };
    if (ours == "embedding.weight" || ours == "lm_head.weight") return {vocab, hidden};
    if (ends("norm.weight")) return {hidden};
    if (ends("q_proj")) return {heads * head_dim, hidden};
    if (ends("k_proj") || ends("v_proj")) return {kv * head_dim, hidden};
    if (ends("o_proj")) return {hidden, heads * head_dim};
    if (ends("q_norm")) return {arch.qk_norm == "head" ? head_dim : heads * head_dim};
    if (ends("k_norm")) return {arch.qk_norm == "head" ? head_dim : kv * head_dim};
    return {experts, hidden};  // router gate
  };
  std::vector<NamedTensor> tensors;
  for (const auto& [ours, theirs] : plain_names(layers, arch)) tensors.push_back({ours, fetch(theirs, shape_of(ours))});
  for (int64_t layer = 0; layer < layers; ++layer) {
    const std::string base = layer_prefix(layer) + arch.moe_module + ".experts.";
    for (auto [ours, theirs, shape] : {std::tuple{"gate_proj", arch.gate_name, std::vector<int64_t>{inner, hidden}},
                                       std::tuple{"up_proj", arch.up_name, std::vector<int64_t>{inner, hidden}},
                                       std::tuple{"down_proj", arch.down_name, std::vector<int64_t>{hidden, inner}}}) {
      std::vector<at::Tensor> per_expert;
      for (int64_t expert = 0; expert < experts; ++expert)
        per_expert.push_back(fetch(base + std::to_string(expert) + "." + theirs + ".weight", shape));
      tensors.push_back({"layers." + std::to_string(layer) + ".experts." + ours, at::stack(per_expert)});  // [E, ...]
    }
  }
  for (const auto& [name, file] : file_of)
    if (!used.count(name) && name.find("rotary_emb.inv_freq") == std::string::npos)
      throw Error(file + ": tensor '" + name + "' has no place in a PithTrain " + arch.model_type +
                  " model (an unsupported feature of this checkpoint)");
  save_safetensors((fs::path(out_dir) / "model.safetensors").string(), tensors, {{"source", hf_dir}});
}

void export_hf(const std::string& config_path, const std::string& weights, const std::string& out_dir) {
  Options config = Options::from_file(config_path);
  Options model = config.table("model");
  const Architecture& arch = architecture(model.required_text("hf_architecture"), config_path);
  Options moe = model.table("moe"), attention = model.table("attention"), router = moe.table("router");
  const int64_t layers = model.required_integer("num_layers"), experts = moe.integer("num_experts", 8);
  if (moe.integer("shared_experts", 0) != 0 || model.integer("first_dense_layers", 0) != 0)
    throw Error(config_path + ": shared experts and dense layers have no place in " + arch.model_type);
  SafetensorsFile source = load_safetensors(weights);
  // Checkpoints prefix model tensors with "model/"; model.safetensors files do not.
  const std::string prefix = source.find("embedding.weight") ? "" : "model/";
  auto get = [&](const std::string& name) {
    const at::Tensor* tensor = source.find(prefix + name);
    if (tensor == nullptr) throw Error(weights + ": tensor '" + prefix + name + "' is missing");
    return *tensor;
  };
  std::vector<NamedTensor> tensors;
  for (const auto& [ours, theirs] : plain_names(layers, arch)) tensors.push_back({theirs, get(ours)});
  for (int64_t layer = 0; layer < layers; ++layer)
    for (auto [ours, theirs] : {std::pair{"gate_proj", arch.gate_name}, {"up_proj", arch.up_name}, {"down_proj", arch.down_name}}) {
      at::Tensor stacked = get("layers." + std::to_string(layer) + ".experts." + ours);
      for (int64_t expert = 0; expert < experts; ++expert)
        tensors.push_back({layer_prefix(layer) + arch.moe_module + ".experts." + std::to_string(expert) + "." + theirs + ".weight",
                           stacked[expert].clone()});
    }
  std::sort(tensors.begin(), tensors.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  fs::create_directories(out_dir);
  save_safetensors((fs::path(out_dir) / "model.safetensors").string(), tensors, {{"format", "pt"}});

  const double eps = model.number("norm_eps", 1e-5);
  std::ofstream json(fs::path(out_dir) / "config.json");
  json << "{\n  \"architectures\": [\"" << arch.hf_class << "\"],\n  \"model_type\": \"" << arch.model_type << "\",\n"
       << "  \"vocab_size\": " << model.required_integer("vocab_size") << ",\n  \"hidden_size\": " << model.required_integer("hidden_size")
       << ",\n  \"num_hidden_layers\": " << layers << ",\n  \"num_attention_heads\": " << model.required_integer("num_heads")
       << ",\n  \"num_key_value_heads\": " << model.integer("num_kv_heads", model.required_integer("num_heads"))
       << ",\n  \"head_dim\": " << model.integer("head_dim", 0) << ",\n  \"rms_norm_eps\": " << toml_number(eps)
       << ",\n  \"rope_parameters\": {\"rope_theta\": " << toml_number(model.number("rope_theta", 10000.0))
       << ", \"rope_type\": \"default\"},\n  \"num_experts\": " << experts << ",\n  \"num_local_experts\": " << experts
       << ",\n  \"num_experts_per_tok\": " << moe.integer("top_k", 2) << ",\n  \"" << arch.expert_size_key
       << "\": " << moe.integer("expert_hidden_size", 0) << ",\n  \"norm_topk_prob\": "
       << (router.boolean("renormalize", true) ? "true" : "false") << ",\n  \"router_aux_loss_coef\": "
       << toml_number(router.number("aux_loss_coeff", 0.01)) << ",\n  \"initializer_range\": "
       << toml_number(model.number("init_std", 0.02)) << ",\n  \"tie_word_embeddings\": false,\n"
       << "  \"hidden_act\": \"silu\",\n  \"torch_dtype\": \"float32\"\n}\n";
}

}  // namespace pithtrain
