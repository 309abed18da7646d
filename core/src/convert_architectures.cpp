// What pithtrain convert knows of each architecture: names, config.json <-> config.toml (convert_architectures.h).
#include "convert_architectures.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

#include "pithtrain/error.h"
#include "pithtrain/nn.h"
#include "pithtrain/options.h"

namespace pithtrain::hf {
namespace fs = std::filesystem;

namespace {

//                 model_type, class, moe module, expert projections, expert keys, qk_norm, always renormalise, attention,
//                 hybrid, split projections, dense_and_shared, router, correction bias
const std::vector<Architecture> kArchitectures = {
    {"qwen3_moe", "Qwen3MoeForCausalLM", "mlp", "gate_proj", "up_proj", "down_proj", "num_experts", "moe_intermediate_size", "head", false},
    {"mixtral", "MixtralForCausalLM", "block_sparse_moe", "w1", "w3", "w2", "num_local_experts", "intermediate_size", "none", true},
    {"olmoe", "OlmoeForCausalLM", "mlp", "gate_proj", "up_proj", "down_proj", "num_experts", "intermediate_size", "full", false},
    {"deepseek_v2", "DeepseekV2ForCausalLM", "mlp", "gate_proj", "up_proj", "down_proj", "n_routed_experts", "moe_intermediate_size",
     "none", false, "mla", false, false, true},
    {"deepseek_v3", "DeepseekV3ForCausalLM", "mlp", "gate_proj", "up_proj", "down_proj", "n_routed_experts", "moe_intermediate_size",
     "none", false, "mla", false, false, true, "aux_free", "mlp.gate.e_score_correction_bias"},
    {"gpt_oss", "GptOssForCausalLM", "mlp", "", "", "", "num_local_experts", "intermediate_size", "none", true},
    {"qwen3_next", "Qwen3NextForCausalLM", "mlp", "gate_proj", "up_proj", "down_proj", "num_experts", "moe_intermediate_size",
     "head", false, "gqa", true},
    {"qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", "mlp", "gate_proj", "up_proj", "down_proj", "num_experts",
     "moe_intermediate_size", "head", true, "gqa", true, true},
    // GLM-4.5 / GLM-4.5-Air: DeepSeek-V3's MoE (dense first layers, shared experts, the aux-free router with groups)
    // under grouped-query attention with q/k/v biases, optional per-head QK-norm and partial rotary embedding.
    {"glm4_moe", "Glm4MoeForCausalLM", "mlp", "gate_proj", "up_proj", "down_proj", "n_routed_experts", "moe_intermediate_size",
     "none", false, "gqa", false, false, true, "aux_free", "mlp.gate.e_score_correction_bias"},
    // MiniMax-M2: Mixtral's tensor names, QK-norm over the whole projections, partial rotary, sigmoid routing with
    // a correction bias (always renormalised, no groups, no shared experts).
    {"minimax_m2", "MiniMaxM2ForCausalLM", "block_sparse_moe", "w1", "w3", "w2", "num_local_experts", "intermediate_size", "full",
     true, "gqa", false, false, false, "aux_free", "block_sparse_moe.e_score_correction_bias"},
};

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

std::string read_file(const fs::path& path) {
  std::ifstream in(path);
  if (!in) throw Error("cannot read '" + path.string() + "'");
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

std::vector<std::pair<std::string, std::string>> plain_names(const Layout& layout, const Architecture& arch) {
  std::vector<std::pair<std::string, std::string>> names = {{"embedding.weight", "model.embed_tokens.weight"},
                                                            {"final_norm.weight", "model.norm.weight"},
                                                            {"lm_head.weight", "lm_head.weight"}};
  for (int64_t layer = 0; layer < layout.layers + layout.mtp_layers; ++layer) {
    const std::string ours = our_layer_prefix(layer, layout), theirs = layer_prefix(layer);
    if (layer >= layout.layers)  // an MTP depth's own tensors; its copies of the embedding and head are shared (convert.cpp)
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
      if (layout.qk_norm) attention.insert(attention.end(), {{"q_norm", "q_norm"}, {"k_norm", "k_norm"}});
    }
    for (const auto& [our_name, their_name] : attention)
      names.push_back({ours + "attention." + our_name, theirs + "self_attn." + their_name + ".weight"});
    if (layout.attention_bias)
      for (const char* projection : {"q_proj", "k_proj", "v_proj", "o_proj"})
        names.push_back({ours + "attention." + projection + "_bias", theirs + "self_attn." + projection + ".bias"});
    if (layout.qkv_bias)
      for (const char* projection : {"q_proj", "k_proj", "v_proj"})
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
    if (layer >= layout.first_dense && arch.router == "aux_free")  // the aux-free bias, a buffer
      names.push_back({ours + "router.expert_bias", theirs + arch.expert_bias_name});
  }
  return names;
}

const Architecture& architecture(const std::string& model_type, const std::string& where) {
  for (const auto& candidate : kArchitectures)
    if (candidate.model_type == model_type) return candidate;
  std::string known;
  for (const auto& candidate : kArchitectures) known += (known.empty() ? "" : ", ") + candidate.model_type;
  throw Error(where + ": model_type '" + model_type + "' is not supported by pithtrain convert (supported: " + known + ")");
}

ImportedConfig import_config(const std::string& hf_dir, const std::string& out_dir) {
  ImportedConfig result;
  const fs::path config_path = fs::path(hf_dir) / "config.json";
  const std::string config_file = config_path.string();
  JsonValue config = parse_json(read_file(config_path), config_file);
  // Qwen3.5 is published as a vision-language model (Qwen3_5MoeForConditionalGeneration): the language model's
  // config is its text_config and its tensors are model.language_model.*; the vision tower is skipped below.
  if (const JsonValue* type = config.find("model_type"); type && type->text == "qwen3_5_moe") {
    const JsonValue* text = config.find("text_config");
    if (text == nullptr || text->type != JsonValue::Type::Object)
      throw Error(config_file + ": model_type 'qwen3_5_moe' has no text_config object (the language model's config)");
    if (number(config, "tie_word_embeddings", config_file, 0.0) != 0.0)
      throw Error(config_file + ": tie_word_embeddings = true is not supported by pithtrain convert (docs/models.md)");
    JsonValue language_model = *text;
    config = std::move(language_model);
    result.language_model_prefix = "model.language_model.";
  }
  const JsonValue* model_type = config.find("model_type");
  if (model_type == nullptr) throw Error(config_file + ": missing 'model_type'");
  const Architecture& arch = architecture(model_type->text, config_file);
  const bool mla = arch.attention == "mla", aux_free = arch.router == "aux_free";
  const bool glm = arch.model_type == "glm4_moe", minimax = arch.model_type == "minimax_m2";

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
  // Without the keys, transformers' defaults: GLM-4.5 one dense layer and one shared expert, DeepSeek none.
  layout.first_dense = arch.dense_and_shared ? integer("first_k_dense_replace", glm ? 1.0 : 0.0) : 0;
  int64_t shared = arch.dense_and_shared ? integer("n_shared_experts", glm ? 1.0 : 0.0) : 0;
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
  layout.q_lora = mla && q_lora && q_lora->type == JsonValue::Type::Number;
  const int64_t top_k = integer("num_experts_per_tok");
  const int64_t head_dim = mla ? integer("v_head_dim") : integer("head_dim", static_cast<double>(hidden / heads));
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
      if (mla) rope_toml << "rope_mscale_all_dim = " << toml_number(mscale_all_dim) << "\n";
    } else if (rope_type != "default") {
      throw Error(config_file + ": rope_type '" + rope_type + "' is not supported (default and yarn are; docs/models.md)");
    }
  }
  const bool gpt_oss = arch.model_type == "gpt_oss";
  layout.attention_bias = number(config, "attention_bias", config_file, 0.0) != 0.0;
  unsupported(layout.attention_bias && !gpt_oss && !glm, "attention_bias = true for " + arch.model_type);
  if (glm) layout.qkv_bias = layout.attention_bias, layout.attention_bias = false;  // GLM-4.5: o_proj has no bias
  // GLM-4.5 has per-head QK-norm when use_qk_norm (GLM-4.5, not -Air); the others always or never have theirs.
  const std::string qk_norm = glm ? (number(config, "use_qk_norm", config_file, 0.0) != 0.0 ? "head" : "none") : arch.qk_norm;
  layout.qk_norm = qk_norm != "none";
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
  const bool renormalize = arch.always_renormalize || number(config, "norm_topk_prob", config_file, arch.hybrid || glm ? 1.0 : 0.0) != 0.0;
  int64_t groups = 1, topk_groups = 1;
  const bool v3 = arch.model_type == "deepseek_v3";
  if (v3 || glm) groups = integer("n_group", 1.0), topk_groups = integer("topk_group", 1.0);
  if (v3) {
    // Multi-token prediction (core/src/mtp.cpp); transformers v5 also spells the key num_mtp_layers.
    layout.mtp_layers = config.find("num_nextn_predict_layers") ? integer("num_nextn_predict_layers") : integer("num_mtp_layers", 0.0);
    unsupported(layout.mtp_layers < 0, "num_nextn_predict_layers < 0");
    if (const JsonValue* interleave = config.find("rope_interleave"); interleave && interleave->type == JsonValue::Type::Bool)
      unsupported(!interleave->boolean, "rope_interleave = false");
  } else if (mla) {
    const JsonValue* method = config.find("topk_method");
    if (method && method->text == "group_limited_greedy") groups = integer("n_group"), topk_groups = integer("topk_group");
    else unsupported(method && method->text != "greedy", "topk_method '" + (method ? method->text : "") + "'");
  }

  // Partial rotary embedding: transformers v5 keeps the factor in rope_parameters, older files at the top level
  // (MiniMax-M2: rotary_dim dimensions); without either, its defaults: 0.25 for the hybrids, 0.5 for GLM-4.5.
  double partial = number(config, "partial_rotary_factor", config_file, arch.hybrid ? 0.25 : glm ? 0.5 : 1.0);
  if (minimax && config.find("rotary_dim")) partial = number(config, "rotary_dim", config_file) / static_cast<double>(head_dim);
  if (rope != nullptr && rope->type == JsonValue::Type::Object && rope->find("partial_rotary_factor"))
    partial = number(*rope, "partial_rotary_factor", config_file);
  const JsonValue* act = config.find("hidden_act");
  unsupported((arch.hybrid || glm || minimax) && act && act->type == JsonValue::Type::String && act->text != "silu",
              "hidden_act '" + (act ? act->text : "") + "' (SwiGLU experts use silu)");
  std::string extra_attention_toml;  // GLM-4.5 and MiniMax-M2
  if (glm || minimax) {
    if (partial != 1.0) extra_attention_toml += "partial_rotary_factor = " + toml_number(partial) + "\n";
    if (layout.qkv_bias) extra_attention_toml += "qkv_bias = true\n";
    // Both publish a multi-token prediction module; like transformers' *ForCausalLM, PithTrain runs without it.
    for (const char* key : {"num_nextn_predict_layers", "num_mtp_modules"})
      if (const int64_t mtp = integer(key, 0.0); mtp > 0) {
        logger().warn("{}: {} = {}: multi-token prediction is not supported; its layers are skipped and the main model is "
                      "imported (docs/models.md)", config_file, key, mtp);
        result.skipped_mtp_layers = mtp;  // stored as model.layers.L, L + 1, ... after the L main layers
      }
  }
  if (minimax) {
    // transformers' MiniMax-M2 always normalises the whole q and k projections, attends fully on every layer,
    // scores by sigmoid with a correction bias and has no shared expert; a config that says otherwise is another model.
    unsupported(number(config, "use_qk_norm", config_file, 1.0) == 0.0, "use_qk_norm = false");
    if (const JsonValue* type = config.find("qk_norm_type"); type && type->type == JsonValue::Type::String)
      unsupported(type->text != "per_layer", "qk_norm_type '" + type->text + "' (per_layer: over all heads together)");
    if (const JsonValue* types = config.find("attn_type_list"))
      for (const auto& item : types->items) unsupported(item.number != 1, "attn_type_list with lightning (linear) attention layers");
    if (const JsonValue* scoring = config.find("scoring_func"); scoring && scoring->type == JsonValue::Type::String)
      unsupported(scoring->text != "sigmoid", "scoring_func '" + scoring->text + "'");
    unsupported(number(config, "use_routing_bias", config_file, 1.0) == 0.0, "use_routing_bias = false");
    unsupported(integer("shared_intermediate_size", 0.0) > 0, "a shared expert (shared_intermediate_size > 0)");
    if (number(config, "router_jitter_noise", config_file, 0.0) > 0)
      logger().warn("{}: router_jitter_noise (a training-time perturbation of the router input) is not applied by PithTrain",
                    config_file);
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
       << "\nnum_kv_heads = " << (mla ? heads : integer("num_key_value_heads", static_cast<double>(heads)))
       << "\nhead_dim = " << head_dim << "\nrope_theta = " << toml_number(rope_theta) << "\nnorm_eps = " << toml_number(eps)
       << "\ninit_std = " << toml_number(number(config, "initializer_range", config_file, 0.02)) << hybrid_model_toml;
  if (arch.dense_and_shared)
    toml << "\nfirst_dense_layers = " << layout.first_dense << "\ndense_hidden_size = " << integer("intermediate_size");
  if (layout.mtp_layers > 0) toml << "\nmtp_layers = " << layout.mtp_layers;
  toml << "\n\n[model.attention]\nplugin = \"" << arch.attention << "\"\n" << rope_toml.str() << window_toml;
  if (gpt_oss) toml << "bias = " << (layout.attention_bias ? "true" : "false") << "\nsinks = true\n";
  if (mla)
    toml << "q_lora_rank = " << (layout.q_lora ? integer("q_lora_rank") : 0) << "\nkv_lora_rank = " << integer("kv_lora_rank")
         << "\nqk_nope_head_dim = " << integer("qk_nope_head_dim") << "\nqk_rope_head_dim = " << integer("qk_rope_head_dim")
         << "\nv_head_dim = " << integer("v_head_dim") << "\nnorm_eps = 1e-06\n";  // transformers' MLA norms keep 1e-6
  else
    toml << "qk_norm = \"" << qk_norm << "\"\nqk_norm_eps = " << toml_number(eps) << "\n" << extra_attention_toml
         << hybrid_attention_toml.str();
  toml << "\n[model.moe]\nnum_experts = " << layout.experts << "\ntop_k = " << top_k
       << "\nexpert_hidden_size = " << integer(arch.expert_size_key) << "\nshared_experts = " << shared
       << (arch.hybrid ? "\nshared_expert_gate = true" : "") << "\n\n"
       << "[model.moe.router]\nplugin = \"" << arch.router << "\"\nrenormalize = "
       << (renormalize ? "true" : "false");
  if (aux_free)
    toml << "\nupdate_rate = 0.001\nrouted_scaling_factor = " << toml_number(number(config, "routed_scaling_factor", config_file, 1.0))
         << "\nnum_groups = " << groups << "\ntopk_groups = " << topk_groups;
  else
    toml << "\naux_loss_coeff = " << toml_number(number(config, mla ? "aux_loss_alpha" : "router_aux_loss_coef", config_file, 0.001));
  if (gpt_oss) toml << "\nbias = true";
  if (mla && !aux_free)
    toml << "\nscaling_factor = " << toml_number(number(config, "routed_scaling_factor", config_file, 1.0))
         << "\nnum_groups = " << groups << "\ntopk_groups = " << topk_groups;
  toml << "\n\n[model.moe.experts]\nplugin = \"grouped\"\n";
  if (gpt_oss)
    toml << "activation = \"clamped_swiglu\"\nbias = true\nswiglu_alpha = " << toml_number(number(config, "swiglu_alpha", config_file, 1.702))
         << "\nswiglu_limit = " << toml_number(number(config, "swiglu_limit", config_file, 7.0)) << "\n";

  result.arch = &arch;
  result.layout = layout;
  result.toml = toml.str();
  result.hidden_size = hidden;
  return result;
}

bool is_mtp_tensor(const ImportedConfig& imported, const std::string& name) {
  if (imported.arch->hybrid) return name.rfind("mtp.", 0) == 0;
  for (int64_t layer = imported.layout.layers; layer < imported.layout.layers + imported.skipped_mtp_layers; ++layer)
    if (name.rfind(layer_prefix(layer), 0) == 0) return true;
  return false;
}

ExportedConfig export_config(const std::string& config_path) {
  Options config = Options::from_file(config_path);
  Options model = config.table("model");
  const Architecture& arch = architecture(model.required_text("hf_architecture"), config_path);
  Options moe = model.table("moe"), attention = model.table("attention"), router = moe.table("router");
  const bool mla = arch.attention == "mla", glm = arch.model_type == "glm4_moe";
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
  layout.qkv_bias = attention.boolean("qkv_bias", false);
  const std::string qk_norm = attention.text("qk_norm", "none");
  layout.qk_norm = glm ? qk_norm != "none" : arch.qk_norm != "none";
  if (layout.qkv_bias && !glm) throw Error(config_path + ": model.attention.qkv_bias has no place in " + arch.model_type + " (glm4_moe has it)");
  if (glm && (attention.boolean("bias", false) || (qk_norm != "none" && qk_norm != "head")))
    throw Error(config_path + ": glm4_moe has biases on q, k and v only (model.attention.qkv_bias, not bias) and a per-head "
                "QK-norm or none (model.attention.qk_norm = \"head\" or \"none\"); docs/models.md");
  if (arch.model_type == "minimax_m2" && qk_norm != "full")
    throw Error(config_path + ": model.attention.qk_norm must be \"full\" to export as minimax_m2 (its q_norm and k_norm span "
                "all heads); docs/models.md");
  if (arch.router == "aux_free" && router.text("plugin", "") != "aux_free")
    throw Error(config_path + ": model.moe.router.plugin must be \"aux_free\" to export as " + arch.model_type +
                " (sigmoid scores with e_score_correction_bias)");
  const int64_t layers = layout.layers, experts = layout.experts;
  if (layout.first_dense != 0 && !arch.dense_and_shared) throw Error(config_path + ": dense layers have no place in " + arch.model_type);
  if (layout.shared_experts && !arch.dense_and_shared && !arch.hybrid)
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
                    arch.hybrid || glm || arch.model_type == "minimax_m2"
                        ? std::optional(attention.number("partial_rotary_factor", 1.0, Range::left_open(0, 1)))
                        : std::nullopt);
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
  const bool v3 = arch.model_type == "deepseek_v3";
  const int64_t groups = router.integer("num_groups", 1, Range::closed(1, static_cast<double>(experts)));
  const int64_t topk_groups = router.integer("topk_groups", groups, Range::closed(1, static_cast<double>(groups)));
  if (arch.dense_and_shared)
    json << ",\n  \"n_routed_experts\": " << experts << ",\n  \"n_shared_experts\": " << moe.integer("shared_experts", 0, Range::at_least(0))
         << ",\n  \"first_k_dense_replace\": " << layout.first_dense
         << ",\n  \"intermediate_size\": " << model.integer("dense_hidden_size", 4 * hidden_size, Range::at_least(1))
         << ",\n  \"routed_scaling_factor\": "
         << toml_number(router.number(arch.router == "aux_free" ? "routed_scaling_factor" : "scaling_factor", 1.0, Range::above(0)))
         << ",\n  \"n_group\": " << groups << ",\n  \"topk_group\": " << topk_groups;
  if (glm)
    json << ",\n  \"attention_bias\": " << (layout.qkv_bias ? "true" : "false") << ",\n  \"use_qk_norm\": "
         << (layout.qk_norm ? "true" : "false") << ",\n  \"num_nextn_predict_layers\": 0";
  if (arch.model_type == "minimax_m2") {  // transformers also reads the legacy rotary_dim; the two agree
    const int64_t head_dim = model.integer("head_dim", hidden_size / num_heads, Range::at_least(2));
    json << ",\n  \"rotary_dim\": "
         << static_cast<int64_t>(static_cast<double>(head_dim) * attention.number("partial_rotary_factor", 1.0, Range::left_open(0, 1)))
         << ",\n  \"use_qk_norm\": true,\n  \"qk_norm_type\": \"per_layer\",\n  \"scoring_func\": \"sigmoid\""
         << ",\n  \"use_routing_bias\": true,\n  \"shared_intermediate_size\": 0,\n  \"use_mtp\": false";
  }
  if (mla) {
    json << ",\n  \"moe_layer_freq\": 1,\n  \"q_lora_rank\": " << (layout.q_lora ? std::to_string(attention.integer("q_lora_rank", 0, Range::at_least(0))) : "null")
         << ",\n  \"kv_lora_rank\": " << attention.integer("kv_lora_rank", 512, Range::at_least(1))
         << ",\n  \"qk_nope_head_dim\": " << attention.integer("qk_nope_head_dim", 128, Range::at_least(0))
         << ",\n  \"qk_rope_head_dim\": " << attention.integer("qk_rope_head_dim", 64, Range::at_least(2))
         << ",\n  \"v_head_dim\": " << attention.integer("v_head_dim", 128, Range::at_least(1))
         << ",\n  \"topk_method\": \"" << (v3 ? "noaux_tc" : topk_groups < groups ? "group_limited_greedy" : "greedy") << "\""
         << (v3 ? ",\n  \"rope_interleave\": true,\n  \"num_nextn_predict_layers\": " + std::to_string(layout.mtp_layers) : "");
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
  ExportedConfig result;
  result.arch = &arch;
  result.layout = layout;
  result.json = json.str();
  return result;
}

}  // namespace pithtrain::hf
