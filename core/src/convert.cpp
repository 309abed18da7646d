// Name and layout mapping between Hugging Face MoE checkpoints and PithTrain's model state.
#include "convert.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>

#include <ATen/ATen.h>

#include "checkpoint.h"
#include "json.h"
#include "model.h"
#include "pithtrain/error.h"
#include "pithtrain/nn.h"
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
  std::string qk_norm;                       // gqa: "none", "head", "full"
  bool always_renormalize;                   // Mixtral renormalises the top-k weights unconditionally
  std::string attention = "gqa";             // "gqa" or "mla"
  // Qwen3-Next and Qwen3.5: Gated DeltaNet and gated full attention by layer_types, zero-centred RMSNorms
  // (1 + w), partial rotary embedding, and one shared expert scaled by sigmoid(shared_expert_gate).
  bool hybrid = false;
  bool split_linear_projections = false;  // Qwen3.5: in_proj_qkv, in_proj_z, in_proj_b, in_proj_a (Qwen3-Next: qkvz, ba)
};

// GPT-OSS stores each layer's experts fused: gate_up_proj [E, H, 2F] with gate and up interleaved
// along the last dimension (gate = 0::2, up = 1::2), down_proj [E, F, H], and their biases.
bool fused_experts(const Architecture& arch) { return arch.model_type == "gpt_oss"; }

const std::vector<Architecture> kArchitectures = {
    {"qwen3_moe", "Qwen3MoeForCausalLM", "mlp", "gate_proj", "up_proj", "down_proj", "num_experts", "moe_intermediate_size", "head", false},
    {"mixtral", "MixtralForCausalLM", "block_sparse_moe", "w1", "w3", "w2", "num_local_experts", "intermediate_size", "none", true},
    {"olmoe", "OlmoeForCausalLM", "mlp", "gate_proj", "up_proj", "down_proj", "num_experts", "intermediate_size", "full", false},
    {"deepseek_v2", "DeepseekV2ForCausalLM", "mlp", "gate_proj", "up_proj", "down_proj", "n_routed_experts", "moe_intermediate_size",
     "none", false, "mla"},
    {"deepseek_v3", "DeepseekV3ForCausalLM", "mlp", "gate_proj", "up_proj", "down_proj", "n_routed_experts", "moe_intermediate_size",
     "none", false, "mla"},
    {"gpt_oss", "GptOssForCausalLM", "mlp", "", "", "", "num_local_experts", "intermediate_size", "none", true},
    {"qwen3_next", "Qwen3NextForCausalLM", "mlp", "gate_proj", "up_proj", "down_proj", "num_experts", "moe_intermediate_size",
     "head", false, "gqa", true},
    {"qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", "mlp", "gate_proj", "up_proj", "down_proj", "num_experts",
     "moe_intermediate_size", "head", true, "gqa", true, true},
};

// The layout facts the tensor names depend on.
struct Layout {
  int64_t layers = 0, first_dense = 0, experts = 0;
  int64_t mtp_layers = 0;  // DeepSeek-V3: multi-token prediction depths, Hugging Face layers num_hidden_layers + d
  bool shared_experts = false, q_lora = false, attention_bias = false;
  std::vector<bool> linear;  // hybrid: per layer, Gated DeltaNet (true) or full attention
  int64_t key_heads = 0, value_heads = 0, key_dim = 0, value_dim = 0;  // hybrid: the Gated DeltaNet sizes
};

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

const Architecture& architecture(const std::string& model_type, const std::string& where) {
  for (const auto& candidate : kArchitectures)
    if (candidate.model_type == model_type) return candidate;
  std::string known;
  for (const auto& candidate : kArchitectures) known += (known.empty() ? "" : ", ") + candidate.model_type;
  throw Error(where + ": model_type '" + model_type + "' is not supported by pithtrain convert (supported: " + known + ")");
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

std::string layer_prefix(int64_t layer) { return "model.layers." + std::to_string(layer) + "."; }

// PithTrain's prefix of Hugging Face layer `layer`: a main layer, or past them an MTP depth (core/src/mtp.cpp).
std::string our_layer_prefix(int64_t layer, const Layout& layout) {
  return layer < layout.layers ? "layers." + std::to_string(layer) + "." : "mtp_layers." + std::to_string(layer - layout.layers) + ".";
}

// (PithTrain name, Hugging Face name) of every tensor but the routed experts'.
std::vector<std::pair<std::string, std::string>> plain_names(const Layout& layout, const Architecture& arch) {
  std::vector<std::pair<std::string, std::string>> names = {{"embedding.weight", "model.embed_tokens.weight"},
                                                            {"final_norm.weight", "model.norm.weight"},
                                                            {"lm_head.weight", "lm_head.weight"}};
  for (int64_t layer = 0; layer < layout.layers + layout.mtp_layers; ++layer) {
    const std::string ours = our_layer_prefix(layer, layout), theirs = layer_prefix(layer);
    if (layer >= layout.layers)  // an MTP depth's own tensors; its copies of the embedding and head are shared (see below)
      for (auto [our_name, their_name] : {std::pair{"enorm.weight", "enorm.weight"}, {"hnorm.weight", "hnorm.weight"},
                                          {"eh_proj.weight", "eh_proj.weight"}, {"final_norm.weight", "shared_head.norm.weight"}})
        names.push_back({ours + our_name, theirs + their_name});
    names.push_back({ours + "attention_norm.weight", theirs + "input_layernorm.weight"});
    names.push_back({ours + "ffn_norm.weight", theirs + "post_attention_layernorm.weight"});
    std::vector<std::pair<std::string, std::string>> attention;
    if (arch.hybrid && layout.linear[layer]) {  // Gated DeltaNet, named as transformers (Qwen3.5's split projections apart)
      std::vector<std::string> weights = {"conv1d", "norm", "out_proj"};
      if (!arch.split_linear_projections) weights.insert(weights.begin(), {"in_proj_qkvz", "in_proj_ba"});
      for (const auto& name : weights) names.push_back({ours + "linear_attention." + name, theirs + "linear_attn." + name + ".weight"});
      for (const char* name : {"dt_bias", "A_log"}) names.push_back({ours + "linear_attention." + name, theirs + "linear_attn." + name});
    } else if (arch.attention == "mla") {
      if (layout.q_lora)
        attention = {{"q_a_proj", "q_a_proj"}, {"q_a_norm", "q_a_layernorm"}, {"q_b_proj", "q_b_proj"}};
      else
        attention = {{"q_proj", "q_proj"}};
      attention.insert(attention.end(), {{"kv_a_proj", "kv_a_proj_with_mqa"}, {"kv_a_norm", "kv_a_layernorm"},
                                         {"kv_b_proj", "kv_b_proj"}, {"o_proj", "o_proj"}});
    } else {
      attention = {{"q_proj", "q_proj"}, {"k_proj", "k_proj"}, {"v_proj", "v_proj"}, {"o_proj", "o_proj"}};
      if (arch.qk_norm != "none") attention.insert(attention.end(), {{"q_norm", "q_norm"}, {"k_norm", "k_norm"}});
    }
    for (const auto& [our_name, their_name] : attention)
      names.push_back({ours + "attention." + our_name, theirs + "self_attn." + their_name + ".weight"});
    if (layout.attention_bias)
      for (const char* projection : {"q_proj", "k_proj", "v_proj", "o_proj"})
        names.push_back({ours + "attention." + projection + "_bias", theirs + "self_attn." + projection + ".bias"});
    if (arch.model_type == "gpt_oss") {
      names.push_back({ours + "attention.sinks", theirs + "self_attn.sinks"});
      names.push_back({ours + "router.gate.weight", theirs + "mlp.router.weight"});
      names.push_back({ours + "router.gate.bias", theirs + "mlp.router.bias"});
      continue;
    }
    const std::string ffn = layer < layout.first_dense ? "mlp." : "shared_experts.";
    const std::string shared = arch.hybrid ? "shared_expert." : "shared_experts.";  // Qwen's one (gated) shared expert
    const std::string their_ffn = theirs + "mlp." + (layer < layout.first_dense ? "" : shared);
    if (layer < layout.first_dense || layout.shared_experts)
      for (const char* projection : {"gate_proj", "up_proj", "down_proj"})
        names.push_back({ours + ffn + projection, their_ffn + projection + ".weight"});
    if (arch.hybrid) names.push_back({ours + "shared_experts.gate", theirs + "mlp.shared_expert_gate.weight"});
    if (layer >= layout.first_dense) names.push_back({ours + "router.gate.weight", theirs + arch.moe_module + ".gate.weight"});
    if (layer >= layout.first_dense && arch.model_type == "deepseek_v3")  // the aux-free bias, a buffer
      names.push_back({ours + "router.expert_bias", theirs + "mlp.gate.e_score_correction_bias"});
  }
  return names;
}

// The shortest decimal that reads back as the same double.
std::string toml_number(double value) {
  char buffer[32];
  for (int digits = 15; digits <= 17; ++digits) {
    std::snprintf(buffer, sizeof(buffer), "%.*g", digits, value);
    if (std::strtod(buffer, nullptr) == value) break;
  }
  std::string text = buffer;
  if (text.find_first_of(".en") == std::string::npos) text += ".0";
  return text;
}

// transformers' rope_parameters for an attention table's rope_* keys.
// `partial`: the hybrid architectures' partial_rotary_factor, which transformers reads from here (default 0.25).
std::string rope_json(Options& attention, double theta, std::optional<double> partial = {}) {
  std::ostringstream json;
  json << "{\"rope_theta\": " << toml_number(theta);
  if (partial) json << ", \"partial_rotary_factor\": " << toml_number(*partial);
  if (attention.text("rope_scaling", "none") == "yarn") {
    // read_rope's defaults and ranges (core/src/nn.cpp).
    const double factor = attention.number("rope_factor", 1.0, Range::at_least(1));
    json << ", \"rope_type\": \"yarn\", \"factor\": " << toml_number(factor)
         << ", \"original_max_position_embeddings\": " << attention.integer("rope_original_max_positions", 4096, Range::at_least(1))
         << ", \"beta_fast\": " << toml_number(attention.number("rope_beta_fast", 32.0, Range::above(0)))
         << ", \"beta_slow\": " << toml_number(attention.number("rope_beta_slow", 1.0, Range::above(0)))
         << ", \"truncate\": " << (attention.boolean("rope_truncate", true) ? "true" : "false")
         << ", \"attention_factor\": "
         << toml_number(attention.number("rope_attention_factor", yarn_mscale(factor, 1.0), Range::above(0)));
    if (attention.has("rope_mscale_all_dim"))
      json << ", \"mscale_all_dim\": " << toml_number(attention.number("rope_mscale_all_dim", 0.0, Range::at_least(0)));
  } else {
    json << ", \"rope_type\": \"default\"";
  }
  return json.str() + "}";
}

}  // namespace

void import_hf(const std::string& hf_dir, const std::string& out_dir) {
  const fs::path config_path = fs::path(hf_dir) / "config.json";
  const std::string config_file = config_path.string();
  JsonValue config = parse_json(read_file(config_path), config_file);
  // Qwen3.5 is published as a vision-language model (Qwen3_5MoeForConditionalGeneration): the language model's
  // config is its text_config and its tensors are model.language_model.*; the vision tower is skipped below.
  std::string language_model_prefix;
  if (const JsonValue* type = config.find("model_type"); type && type->text == "qwen3_5_moe") {
    const JsonValue* text = config.find("text_config");
    if (text == nullptr || text->type != JsonValue::Type::Object)
      throw Error(config_file + ": model_type 'qwen3_5_moe' has no text_config object (the language model's config)");
    if (number(config, "tie_word_embeddings", config_file, 0.0) != 0.0)
      throw Error(config_file + ": tie_word_embeddings = true is not supported by pithtrain convert (docs/models.md)");
    JsonValue language_model = *text;
    config = std::move(language_model);
    language_model_prefix = "model.language_model.";
  }
  const JsonValue* model_type = config.find("model_type");
  if (model_type == nullptr) throw Error(config_file + ": missing 'model_type'");
  const Architecture& arch = architecture(model_type->text, config_file);
  const bool deepseek = arch.attention == "mla";

  auto integer = [&](const std::string& key, std::optional<double> fallback = {}) {
    return static_cast<int64_t>(number(config, key, config_file, fallback));
  };
  auto unsupported = [&](bool condition, const std::string& what) {
    if (condition) throw Error(config_file + ": " + what + " is not supported by pithtrain convert (docs/models.md)");
  };
  Layout layout;
  layout.layers = integer("num_hidden_layers");
  const int64_t hidden = integer("hidden_size"), heads = integer("num_attention_heads");
  // Hub files name the expert count num_experts (Qwen3, OLMoE), num_local_experts (Mixtral) or
  // n_routed_experts (DeepSeek); newer transformers versions write num_local_experts for the first three.
  layout.experts = config.find(arch.experts_key) ? integer(arch.experts_key) : integer("num_local_experts");
  layout.first_dense = deepseek ? integer("first_k_dense_replace", 0.0) : 0;
  int64_t shared = deepseek ? integer("n_shared_experts", 0.0) : 0;
  if (arch.hybrid) {  // one shared expert of its own width, which PithTrain builds as shared_experts x expert_hidden_size
    const int64_t width = integer("shared_expert_intermediate_size"), expert = integer(arch.expert_size_key);
    if (width <= 0 || width % expert != 0)
      throw Error(config_file + ": shared_expert_intermediate_size = " + std::to_string(width) + " is not a positive multiple of " +
                  arch.expert_size_key + " = " + std::to_string(expert) +
                  "; PithTrain's shared experts are shared_experts x expert_hidden_size wide (docs/models.md)");
    shared = width / expert;
  }
  layout.shared_experts = shared > 0;
  const JsonValue* q_lora = config.find("q_lora_rank");
  layout.q_lora = deepseek && q_lora && q_lora->type == JsonValue::Type::Number;
  const int64_t top_k = integer("num_experts_per_tok");
  const int64_t head_dim = deepseek ? integer("v_head_dim") : integer("head_dim", static_cast<double>(hidden / heads));
  // Rotary settings: transformers v5 writes rope_parameters (rope_theta inside), older files rope_theta
  // and an optional rope_scaling.
  double rope_theta = number(config, "rope_theta", config_file, 10000.0);
  std::ostringstream rope_toml;  // the attention table's rope_* keys
  const JsonValue* rope = config.find("rope_parameters");
  if (rope == nullptr || rope->type != JsonValue::Type::Object) rope = config.find("rope_scaling");
  if (rope != nullptr && rope->type == JsonValue::Type::Object) {
    rope_theta = number(*rope, "rope_theta", config_file, rope_theta);
    const JsonValue* type = rope->find("rope_type") ? rope->find("rope_type") : rope->find("type");
    const std::string rope_type = type ? type->text : "default";
    if (rope_type == "yarn") {
      const double original = rope->find("original_max_position_embeddings")
                                  ? number(*rope, "original_max_position_embeddings", config_file)
                                  : number(config, "max_position_embeddings", config_file);
      const double factor = rope->find("factor") ? number(*rope, "factor", config_file)
                                                 : number(config, "max_position_embeddings", config_file) / original;
      const double mscale = number(*rope, "mscale", config_file, 0.0), mscale_all_dim = number(*rope, "mscale_all_dim", config_file, 0.0);
      // transformers' default: the ratio of the two corrections when both are given, else 0.1 ln(factor) + 1.
      const double attention_factor = number(*rope, "attention_factor", config_file,
          mscale != 0.0 && mscale_all_dim != 0.0 ? yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                                                 : yarn_mscale(factor, 1.0));
      const double beta_fast = number(*rope, "beta_fast", config_file, 32.0), beta_slow = number(*rope, "beta_slow", config_file, 1.0);
      rope_toml << "rope_scaling = \"yarn\"\nrope_factor = " << toml_number(factor) << "\nrope_original_max_positions = "
                << static_cast<int64_t>(original) << "\nrope_beta_fast = " << toml_number(beta_fast == 0 ? 32.0 : beta_fast)
                << "\nrope_beta_slow = " << toml_number(beta_slow == 0 ? 1.0 : beta_slow) << "\nrope_truncate = "
                << (number(*rope, "truncate", config_file, 1.0) != 0.0 ? "true" : "false")
                << "\nrope_attention_factor = " << toml_number(attention_factor) << "\n";
      if (deepseek) rope_toml << "rope_mscale_all_dim = " << toml_number(mscale_all_dim) << "\n";
    } else if (rope_type != "default") {
      throw Error(config_file + ": rope_type '" + rope_type + "' is not supported (default and yarn are; docs/models.md)");
    }
  }
  const bool gpt_oss = arch.model_type == "gpt_oss";
  layout.attention_bias = number(config, "attention_bias", config_file, 0.0) != 0.0;
  unsupported(layout.attention_bias && !gpt_oss, "attention_bias = true for " + arch.model_type);
  // GPT-OSS alternates sliding-window and full attention through layer_types.
  std::string window_toml;
  if (gpt_oss) {
    const JsonValue* types = config.find("layer_types");
    int64_t sliding = 0, even_sliding = 0;
    const int64_t count = types ? static_cast<int64_t>(types->items.size()) : layout.layers;
    for (int64_t layer = 0; layer < count; ++layer) {
      const std::string type = types ? types->items[layer].text : (layer % 2 == 0 ? "sliding_attention" : "full_attention");
      unsupported(type != "sliding_attention" && type != "full_attention", "layer type '" + type + "'");
      sliding += type == "sliding_attention", even_sliding += (type == "sliding_attention") == (layer % 2 == 0);
    }
    const JsonValue* window = config.find("sliding_window");
    if (window && window->type == JsonValue::Type::Number && sliding > 0) {
      std::string pattern = sliding == count ? "all" : even_sliding == count ? "even" : even_sliding == 0 ? "odd" : "";
      unsupported(pattern.empty(), "a layer_types pattern other than all, even or odd layers sliding");
      window_toml = "sliding_window = " + std::to_string(static_cast<int64_t>(window->number)) + "\nsliding_window_layers = \"" +
                    pattern + "\"\n";
    }
  }
  if (config.find("quantization_config"))  // e.g. GPT-OSS's published MXFP4 experts
    throw Error(config_file + ": a quantized checkpoint (quantization_config) is not supported by pithtrain convert; "
                "save a dequantized bf16 copy first (docs/models.md, GPT-OSS)");
  unsupported(number(config, "tie_word_embeddings", config_file, 0.0) != 0.0, "tie_word_embeddings = true");
  if (const JsonValue* window = config.find("sliding_window"); window && window->type == JsonValue::Type::Number && !gpt_oss)
    unsupported(number(config, "use_sliding_window", config_file, 1.0) != 0.0, "sliding-window attention");
  if (const JsonValue* dense = config.find("mlp_only_layers"); dense && !dense->items.empty())
    unsupported(true, "mlp_only_layers (dense layers must come first: first_dense_layers)");
  unsupported(integer("decoder_sparse_step", 1.0) != 1 || integer("moe_layer_freq", 1.0) != 1, "MoE on every k-th layer");
  if (const JsonValue* clip = config.find("clip_qkv"); clip && clip->type == JsonValue::Type::Number) unsupported(true, "clip_qkv");
  const double eps = number(config, "rms_norm_eps", config_file, 1e-6);
  // Without the key, transformers' default: true for Qwen3-Next, false for the others.
  const bool renormalize = arch.always_renormalize || number(config, "norm_topk_prob", config_file, arch.hybrid ? 1.0 : 0.0) != 0.0;
  int64_t groups = 1, topk_groups = 1;
  const bool v3 = arch.model_type == "deepseek_v3";
  if (v3) {
    groups = integer("n_group", 1.0), topk_groups = integer("topk_group", 1.0);
    // Multi-token prediction (core/src/mtp.cpp); transformers v5 also spells the key num_mtp_layers.
    layout.mtp_layers = config.find("num_nextn_predict_layers") ? integer("num_nextn_predict_layers") : integer("num_mtp_layers", 0.0);
    unsupported(layout.mtp_layers < 0, "num_nextn_predict_layers < 0");
    if (const JsonValue* interleave = config.find("rope_interleave"); interleave && interleave->type == JsonValue::Type::Bool)
      unsupported(!interleave->boolean, "rope_interleave = false");
  } else if (deepseek) {
    const JsonValue* method = config.find("topk_method");
    if (method && method->text == "group_limited_greedy") groups = integer("n_group"), topk_groups = integer("topk_group");
    else unsupported(method && method->text != "greedy", "topk_method '" + (method ? method->text : "") + "'");
  }

  // Qwen3-Next / Qwen3.5: the layer types, the gated full attention's keys and the Gated DeltaNet table.
  std::string hybrid_model_toml;
  std::ostringstream hybrid_attention_toml;
  if (arch.hybrid) {
    const JsonValue* types = config.find("layer_types");
    if (types && static_cast<int64_t>(types->items.size()) != layout.layers)
      throw Error(config_file + ": layer_types has " + std::to_string(types->items.size()) + " entries but num_hidden_layers = " +
                  std::to_string(layout.layers) + "; give one type per layer");
    const int64_t interval = integer("full_attention_interval", 4.0);  // transformers' default without layer_types
    unsupported(!types && interval < 1, "full_attention_interval < 1");
    hybrid_model_toml = "\nnorm_zero_centered = true\nlayer_types = [";
    for (int64_t layer = 0; layer < layout.layers; ++layer) {
      const std::string type = types ? types->items[layer].text : (layer + 1) % interval == 0 ? "full_attention" : "linear_attention";
      unsupported(type != "linear_attention" && type != "full_attention", "layer type '" + type + "'");
      layout.linear.push_back(type == "linear_attention");
      hybrid_model_toml += std::string(layer ? ", " : "") + "\"" + type + "\"";
    }
    hybrid_model_toml += "]";
    layout.key_heads = integer("linear_num_key_heads"), layout.value_heads = integer("linear_num_value_heads");
    layout.key_dim = integer("linear_key_head_dim"), layout.value_dim = integer("linear_value_head_dim");
    if (const JsonValue* gate = config.find("attn_output_gate"); gate && gate->type == JsonValue::Type::Bool)
      unsupported(!gate->boolean, "attn_output_gate = false (the full attention is gated)");
    if (const JsonValue* act = config.find("hidden_act"); act && act->type == JsonValue::Type::String)
      unsupported(act->text != "silu", "hidden_act '" + act->text + "' (SwiGLU experts use silu)");
    // transformers v5 keeps the factor in rope_parameters; older files at the top level; 0.25 is its default.
    const bool in_rope = rope != nullptr && rope->type == JsonValue::Type::Object && rope->find("partial_rotary_factor");
    const double partial = in_rope ? number(*rope, "partial_rotary_factor", config_file)
                                   : number(config, "partial_rotary_factor", config_file, 0.25);
    hybrid_attention_toml << "qk_norm_zero_centered = true\noutput_gate = true\npartial_rotary_factor = " << toml_number(partial)
                          << "\n\n[model.linear_attention]\nplugin = \"gated_deltanet\"\nnum_key_heads = " << layout.key_heads
                          << "\nnum_value_heads = " << layout.value_heads << "\nkey_head_dim = " << layout.key_dim
                          << "\nvalue_head_dim = " << layout.value_dim << "\nconv_kernel = " << integer("linear_conv_kernel_dim")
                          << "\nnorm_eps = " << toml_number(eps) << "\n";
    // The published checkpoints carry multi-token prediction layers (mtp.*); PithTrain trains without them.
    for (const char* key : {"num_nextn_predict_layers", "mtp_num_hidden_layers"})
      if (const int64_t mtp = integer(key, 0.0); mtp > 0)
        logger().warn("{}: {} = {}: multi-token prediction is not supported; its layers (mtp.* tensors) are skipped and the "
                      "main model is imported (docs/models.md)", config_file, key, mtp);
  }

  std::ostringstream toml;
  toml << "# Imported by `pithtrain convert import " << hf_dir << "` (" << arch.hf_class << ").\n\n"
       << "[run]\nname = \"" << fs::path(out_dir).filename().string() << "\"\n\n"
       << "[data]\npath = \"data/fortunes.tokens\"   # replace with data tokenized for this model's vocabulary\n\n"
       << "[model]\nhf_architecture = \"" << arch.model_type << "\"\nvocab_size = " << integer("vocab_size")
       << "\nhidden_size = " << hidden << "\nnum_layers = " << layout.layers << "\nnum_heads = " << heads
       << "\nnum_kv_heads = " << (deepseek ? heads : integer("num_key_value_heads", static_cast<double>(heads)))
       << "\nhead_dim = " << head_dim << "\nrope_theta = " << toml_number(rope_theta) << "\nnorm_eps = " << toml_number(eps)
       << "\ninit_std = " << toml_number(number(config, "initializer_range", config_file, 0.02)) << hybrid_model_toml;
  if (deepseek)
    toml << "\nfirst_dense_layers = " << layout.first_dense << "\ndense_hidden_size = " << integer("intermediate_size");
  if (layout.mtp_layers > 0) toml << "\nmtp_layers = " << layout.mtp_layers;
  toml << "\n\n[model.attention]\nplugin = \"" << arch.attention << "\"\n" << rope_toml.str() << window_toml;
  if (gpt_oss) toml << "bias = " << (layout.attention_bias ? "true" : "false") << "\nsinks = true\n";
  if (deepseek)
    toml << "q_lora_rank = " << (layout.q_lora ? integer("q_lora_rank") : 0) << "\nkv_lora_rank = " << integer("kv_lora_rank")
         << "\nqk_nope_head_dim = " << integer("qk_nope_head_dim") << "\nqk_rope_head_dim = " << integer("qk_rope_head_dim")
         << "\nv_head_dim = " << integer("v_head_dim") << "\nnorm_eps = 1e-06\n";  // transformers' MLA norms keep 1e-6
  else
    toml << "qk_norm = \"" << arch.qk_norm << "\"\nqk_norm_eps = " << toml_number(eps) << "\n" << hybrid_attention_toml.str();
  toml << "\n[model.moe]\nnum_experts = " << layout.experts << "\ntop_k = " << top_k
       << "\nexpert_hidden_size = " << integer(arch.expert_size_key) << "\nshared_experts = " << shared
       << (arch.hybrid ? "\nshared_expert_gate = true" : "") << "\n\n"
       << "[model.moe.router]\nplugin = \"" << (v3 ? "aux_free" : "topk_softmax") << "\"\nrenormalize = "
       << (renormalize ? "true" : "false");
  if (v3)
    toml << "\nupdate_rate = 0.001\nrouted_scaling_factor = " << toml_number(number(config, "routed_scaling_factor", config_file, 1.0))
         << "\nnum_groups = " << groups << "\ntopk_groups = " << topk_groups;
  else
    toml << "\naux_loss_coeff = " << toml_number(number(config, deepseek ? "aux_loss_alpha" : "router_aux_loss_coef", config_file, 0.001));
  if (gpt_oss) toml << "\nbias = true";
  if (deepseek && !v3)
    toml << "\nscaling_factor = " << toml_number(number(config, "routed_scaling_factor", config_file, 1.0))
         << "\nnum_groups = " << groups << "\ntopk_groups = " << topk_groups;
  toml << "\n\n[model.moe.experts]\nplugin = \"grouped\"\n";
  if (gpt_oss)
    toml << "activation = \"clamped_swiglu\"\nbias = true\nswiglu_alpha = " << toml_number(number(config, "swiglu_alpha", config_file, 1.702))
         << "\nswiglu_limit = " << toml_number(number(config, "swiglu_limit", config_file, 7.0)) << "\n";

  // The shapes every tensor must have come from the model this config builds (on the meta device).
  Options options = Options::from_string(toml.str(), (fs::path(out_dir) / "config.toml").string());
  PluginRegistry registry(default_search_dirs({}), {});
  PluginContext context;
  context.device = c10::Device(c10::kMeta);
  context.logger = &logger();
  Model model(options.table("model"), registry, context);
  std::map<std::string, std::vector<int64_t>> shape_of;
  for (const auto& item : model.state()) shape_of[item.name] = item.tensor.sizes().vec();

  // Tensors: one model.safetensors, or shards listed by model.safetensors.index.json.
  std::map<std::string, std::string> file_of;  // HF name -> shard path
  std::map<std::string, SafetensorsFile> shards;
  const fs::path index = fs::path(hf_dir) / "model.safetensors.index.json";
  if (fs::exists(index)) {
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
    for (const auto& tensor : load_safetensors(single).tensors) file_of[tensor.name] = single;
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
  auto fetch = [&](const std::string& name, at::IntArrayRef shape) {
    auto found = file_of.find(name);
    if (found == file_of.end()) throw Error(hf_dir + ": tensor '" + name + "' is missing (no shard lists it)");
    if (!shards.count(found->second)) shards.emplace(found->second, load_safetensors(found->second));
    const at::Tensor* tensor = shards.at(found->second).find(stored_name.count(name) ? stored_name.at(name) : name);
    if (tensor == nullptr) throw Error(found->second + ": tensor '" + name + "' is missing");
    if (tensor->sizes() != shape)
      throw Error(found->second + ": tensor '" + name + "' has shape " + c10::str(tensor->sizes()) + ", config.json implies " +
                  c10::str(shape));
    used.insert(name);
    return *tensor;
  };
  std::vector<NamedTensor> tensors;
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
        std::vector<at::Tensor> per_expert;
        for (int64_t expert = 0; expert < layout.experts; ++expert)
          per_expert.push_back(fetch(base + std::to_string(expert) + "." + theirs + ".weight", shape));
        tensors.push_back({our_name, at::stack(per_expert)});  // [E, ...]
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
    for (auto [copy, shared_name] : {std::pair{"embed_tokens.weight", "embedding.weight"}, {"shared_head.head.weight", "lm_head.weight"}}) {
      const std::string name = layer_prefix(layout.layers + depth) + copy;
      if (!file_of.count(name)) continue;
      const at::Tensor* shared_tensor = nullptr;
      for (const auto& tensor : tensors)
        if (tensor.name == shared_name) shared_tensor = &tensor.tensor;
      if (!at::equal(fetch(name, shape_of.at(shared_name)), *shared_tensor))
        logger().warn("{}: '{}' differs from the main model's copy; multi-token prediction shares the main one ({})", hf_dir,
                      name, shared_name);
    }
  int64_t skipped_mtp = 0;
  for (const auto& [name, file] : file_of) {
    if (arch.hybrid && name.rfind("mtp.", 0) == 0) {  // multi-token prediction: not part of the model (warned above)
      skipped_mtp += !used.count(name);
      continue;
    }
    if (!used.count(name) && name.find("rotary_emb.inv_freq") == std::string::npos)
      throw Error(file + ": tensor '" + name + "' has no place in a PithTrain " + arch.model_type +
                  " model (an unsupported feature of this checkpoint)");
  }
  if (skipped_mtp > 0) logger().warn("{}: skipped {} multi-token prediction tensors (mtp.*)", hf_dir, skipped_mtp);
  // Written only now that every tensor is found and checked: a failed import leaves DIR as it was.
  create_output_folder(out_dir);
  save_safetensors((fs::path(out_dir) / "model.safetensors").string(), tensors, {{"source", hf_dir}});
  write_text_file(fs::path(out_dir) / "config.toml", toml.str());
}

void export_hf(const std::string& config_path, const std::string& weights, const std::string& out_dir) {
  Options config = Options::from_file(config_path);
  Options model = config.table("model");
  const Architecture& arch = architecture(model.required_text("hf_architecture"), config_path);
  Options moe = model.table("moe"), attention = model.table("attention"), router = moe.table("router");
  const bool deepseek = arch.attention == "mla";
  Layout layout;
  // The model's and its plugins' defaults and ranges (core/src/model.cpp, plugins/).
  layout.layers = model.required_integer("num_layers", Range::at_least(1));
  layout.experts = moe.integer("num_experts", 8, Range::at_least(1));
  layout.first_dense = model.integer("first_dense_layers", 0, Range::closed(0, static_cast<double>(layout.layers)));
  layout.shared_experts = moe.integer("shared_experts", 0, Range::at_least(0)) > 0;
  layout.q_lora = attention.integer("q_lora_rank", 0, Range::at_least(0)) > 0;
  layout.mtp_layers = model.integer("mtp_layers", 0, Range::at_least(0));
  if (layout.mtp_layers > 0 && arch.model_type != "deepseek_v3")
    throw Error(config_path + ": model.mtp_layers = " + std::to_string(layout.mtp_layers) + ": multi-token prediction exports as "
                "deepseek_v3 only (num_nextn_predict_layers); set model.mtp_layers = 0 to export the main model");
  const bool gpt_oss = arch.model_type == "gpt_oss";
  layout.attention_bias = gpt_oss && attention.boolean("bias", false);
  const int64_t layers = layout.layers, experts = layout.experts;
  if (layout.first_dense != 0 && !deepseek) throw Error(config_path + ": dense layers have no place in " + arch.model_type);
  if (layout.shared_experts && !deepseek && !arch.hybrid)
    throw Error(config_path + ": shared experts have no place in " + arch.model_type);
  Options linear = model.table("linear_attention");
  if (arch.hybrid) {
    // Each layer's type, and the options the Hugging Face model always has.
    std::vector<std::string> types(layers, "full_attention");  // without either key (core/src/layer_types.cpp)
    if (model.has("layer_types")) {
      types = model.text_list("layer_types", {});
    } else if (model.has("full_attention_interval")) {
      const int64_t interval = model.integer("full_attention_interval", 4, Range::closed(1, static_cast<double>(layers)));
      for (int64_t layer = 0; layer < layers; ++layer) types[layer] = (layer + 1) % interval ? "linear_attention" : "full_attention";
    }
    if (static_cast<int64_t>(types.size()) != layers)
      throw Error(config_path + ": model.layer_types has " + std::to_string(types.size()) + " entries but model.num_layers = " +
                  std::to_string(layers));
    for (const auto& type : types) {
      if (type != "linear_attention" && type != "full_attention")
        throw Error(config_path + ": layer type '" + type + "' has no place in " + arch.model_type +
                    " (linear_attention, full_attention)");
      layout.linear.push_back(type == "linear_attention");
    }
    const bool any_linear = std::count(layout.linear.begin(), layout.linear.end(), true) > 0;
    auto need = [&](bool ok, const std::string& key, const std::string& value) {
      if (!ok)
        throw Error(config_path + ": " + key + " must be " + value + " to export as " + arch.model_type +
                    " (its Hugging Face model has no other; docs/models.md)");
    };
    const double eps = model.number("norm_eps", 1e-5, Range::above(0));
    need(model.boolean("norm_zero_centered", false), "model.norm_zero_centered", "true");
    need(attention.text("plugin", "gqa") == "gqa", "model.attention.plugin", "\"gqa\"");
    need(attention.text("qk_norm", "none") == "head", "model.attention.qk_norm", "\"head\"");
    need(attention.boolean("qk_norm_zero_centered", false), "model.attention.qk_norm_zero_centered", "true");
    need(attention.boolean("output_gate", false), "model.attention.output_gate", "true");
    need(attention.number("qk_norm_eps", 1e-6, Range::above(0)) == eps, "model.attention.qk_norm_eps",
         "model.norm_eps (one rms_norm_eps)");
    need(layout.shared_experts && moe.boolean("shared_expert_gate", false), "model.moe.shared_expert_gate",
         "true, with shared_experts >= 1");
    if (arch.always_renormalize) need(router.boolean("renormalize", true), "model.moe.router.renormalize", "true");
    if (any_linear) {
      need(linear.text("plugin", "") == "gated_deltanet", "model.linear_attention.plugin", "\"gated_deltanet\"");
      need(linear.number("norm_eps", 1e-6, Range::above(0)) == eps, "model.linear_attention.norm_eps",
           "model.norm_eps (one rms_norm_eps)");
    }
    // gated_deltanet's defaults (plugins/attention/gated_deltanet/README.md).
    const int64_t heads = model.required_integer("num_heads", Range::at_least(1));
    const int64_t head_dim =
        model.integer("head_dim", model.required_integer("hidden_size", Range::at_least(1)) / heads, Range::at_least(2));
    layout.key_heads = linear.integer("num_key_heads", heads, Range::at_least(1));
    layout.value_heads = linear.integer("num_value_heads", layout.key_heads, Range::at_least(1));
    layout.key_dim = linear.integer("key_head_dim", head_dim, Range::at_least(1));
    layout.value_dim = linear.integer("value_head_dim", layout.key_dim, Range::at_least(1));
  } else {
    if (model.has("layer_types") || model.has("full_attention_interval"))
      throw Error(config_path + ": per-layer attention (model.layer_types or model.full_attention_interval) has no place in " +
                  arch.model_type + " (qwen3_next and qwen3_5_moe_text have it)");
    if (model.boolean("norm_zero_centered", false) || attention.boolean("qk_norm_zero_centered", false) ||
        moe.boolean("shared_expert_gate", false))
      throw Error(config_path + ": zero-centred norms (model.norm_zero_centered, model.attention.qk_norm_zero_centered) and a "
                  "gated shared expert (model.moe.shared_expert_gate) have no place in " + arch.model_type +
                  " (qwen3_next and qwen3_5_moe_text have them)");
  }
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

  // config.json is composed first (it reads required keys that may be missing): a failed export writes nothing.
  const double eps = model.number("norm_eps", 1e-5, Range::above(0));
  const int64_t hidden_size = model.required_integer("hidden_size", Range::at_least(1));
  const int64_t num_heads = model.required_integer("num_heads", Range::at_least(1));
  std::ostringstream json;
  json << "{\n  \"architectures\": [\"" << arch.hf_class << "\"],\n  \"model_type\": \"" << arch.model_type << "\",\n"
       << "  \"vocab_size\": " << model.required_integer("vocab_size", Range::at_least(1)) << ",\n  \"hidden_size\": " << hidden_size
       << ",\n  \"num_hidden_layers\": " << layers << ",\n  \"num_attention_heads\": " << num_heads
       << ",\n  \"num_key_value_heads\": " << model.integer("num_kv_heads", num_heads, Range::at_least(1))
       << ",\n  \"head_dim\": " << model.integer("head_dim", hidden_size / num_heads, Range::at_least(2))
       << ",\n  \"rms_norm_eps\": " << toml_number(eps)
       << ",\n  \"rope_parameters\": "
       << rope_json(attention, model.number("rope_theta", 10000.0, Range::above(0)),
                    arch.hybrid ? std::optional(attention.number("partial_rotary_factor", 1.0, Range::left_open(0, 1))) : std::nullopt);
  if (attention.text("rope_scaling", "none") == "yarn")  // the context YaRN extends to, as transformers expects it
    json << ",\n  \"max_position_embeddings\": "
         << static_cast<int64_t>(attention.integer("rope_original_max_positions", 4096, Range::at_least(1)) *
                                 attention.number("rope_factor", 1.0, Range::at_least(1)));
  json << ",\n  \"num_experts\": " << experts << ",\n  \"num_local_experts\": " << experts
       << ",\n  \"num_experts_per_tok\": " << moe.integer("top_k", 2, Range::closed(1, static_cast<double>(experts)))
       << ",\n  \"" << arch.expert_size_key
       << "\": " << moe.integer("expert_hidden_size", hidden_size, Range::at_least(1)) << ",\n  \"norm_topk_prob\": "
       << (router.boolean("renormalize", true) ? "true" : "false") << ",\n  \"router_aux_loss_coef\": "
       << toml_number(router.number("aux_loss_coeff", 0.01, Range::at_least(0))) << ",\n  \"initializer_range\": "
       << toml_number(model.number("init_std", 0.02, Range::above(0))) << ",\n  \"tie_word_embeddings\": false,\n"
       << "  \"hidden_act\": \"silu\",\n  \"torch_dtype\": \"float32\"";
  if (deepseek) {
    const bool v3 = arch.model_type == "deepseek_v3";
    const int64_t groups = router.integer("num_groups", 1, Range::closed(1, static_cast<double>(experts)));
    const int64_t topk_groups = router.integer("topk_groups", groups, Range::closed(1, static_cast<double>(groups)));
    json << ",\n  \"n_routed_experts\": " << experts << ",\n  \"n_shared_experts\": " << moe.integer("shared_experts", 0, Range::at_least(0))
         << ",\n  \"first_k_dense_replace\": " << layout.first_dense << ",\n  \"moe_layer_freq\": 1"
         << ",\n  \"intermediate_size\": " << model.integer("dense_hidden_size", 4 * hidden_size, Range::at_least(1))
         << ",\n  \"q_lora_rank\": " << (layout.q_lora ? std::to_string(attention.integer("q_lora_rank", 0, Range::at_least(0))) : "null")
         << ",\n  \"kv_lora_rank\": " << attention.integer("kv_lora_rank", 512, Range::at_least(1))
         << ",\n  \"qk_nope_head_dim\": " << attention.integer("qk_nope_head_dim", 128, Range::at_least(0))
         << ",\n  \"qk_rope_head_dim\": " << attention.integer("qk_rope_head_dim", 64, Range::at_least(2))
         << ",\n  \"v_head_dim\": " << attention.integer("v_head_dim", 128, Range::at_least(1))
         << ",\n  \"routed_scaling_factor\": "
         << toml_number(router.number(v3 ? "routed_scaling_factor" : "scaling_factor", 1.0, Range::above(0)))
         << ",\n  \"topk_method\": \"" << (v3 ? "noaux_tc" : topk_groups < groups ? "group_limited_greedy" : "greedy") << "\""
         << (v3 ? ",\n  \"rope_interleave\": true,\n  \"num_nextn_predict_layers\": " + std::to_string(layout.mtp_layers) : "")
         << ",\n  \"n_group\": " << groups << ",\n  \"topk_group\": " << topk_groups;
  }
  if (gpt_oss) {
    const std::string window_layers = attention.text("sliding_window_layers", "all");
    const int64_t window = attention.integer("sliding_window", 0, Range::at_least(0));
    json << ",\n  \"attention_bias\": " << (layout.attention_bias ? "true" : "false") << ",\n  \"sliding_window\": "
         << (window > 0 ? std::to_string(window) : "null") << ",\n  \"layer_types\": [";
    for (int64_t layer = 0; layer < layers; ++layer) {
      const bool sliding = window > 0 && (window_layers == "all" || (window_layers == "even") == (layer % 2 == 0));
      json << (layer ? ", " : "") << (sliding ? "\"sliding_attention\"" : "\"full_attention\"");
    }
    Options experts_table = moe.table("experts");
    json << "],\n  \"swiglu_alpha\": " << toml_number(experts_table.number("swiglu_alpha", 1.702, Range::above(0)))
         << ",\n  \"swiglu_limit\": " << toml_number(experts_table.number("swiglu_limit", 7.0, Range::above(0)));
  }
  if (arch.hybrid) {
    json << ",\n  \"layer_types\": [";
    for (int64_t layer = 0; layer < layers; ++layer)
      json << (layer ? ", " : "") << (layout.linear[layer] ? "\"linear_attention\"" : "\"full_attention\"");
    json << "],\n  \"shared_expert_intermediate_size\": "
         << moe.integer("shared_experts", 0, Range::at_least(0)) * moe.integer("expert_hidden_size", hidden_size, Range::at_least(1))
         << ",\n  \"linear_num_key_heads\": " << layout.key_heads << ",\n  \"linear_num_value_heads\": " << layout.value_heads
         << ",\n  \"linear_key_head_dim\": " << layout.key_dim << ",\n  \"linear_value_head_dim\": " << layout.value_dim
         << ",\n  \"linear_conv_kernel_dim\": " << linear.integer("conv_kernel", 4, Range::at_least(1))
         << ",\n  \"decoder_sparse_step\": 1,\n  \"mlp_only_layers\": []";
  }
  json << "\n}\n";
  create_output_folder(out_dir);
  save_safetensors((fs::path(out_dir) / "model.safetensors").string(), tensors, {{"format", "pt"}});
  write_text_file(fs::path(out_dir) / "config.json", json.str());
}

}  // namespace pithtrain
