// What `pithtrain convert` knows of each Hugging Face architecture: the table of what differs between them,
// the tensor names, and the translation of config.json to a PithTrain config.toml and back. convert.cpp moves
// the tensors; this file decides their names and what the configs say.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "json.h"

namespace pithtrain::hf {

// What differs between the supported architectures.
struct Architecture {
  std::string model_type, hf_class;
  std::string moe_module;                    // "mlp" or "block_sparse_moe"
  std::string gate_name, up_name, down_name; // per-expert projection names
  std::string experts_key, expert_size_key;  // config.json keys
  std::string qk_norm;                       // gqa: "none", "head", "full" (GLM-4.5: from use_qk_norm)
  bool always_renormalize;                   // Mixtral renormalises the top-k weights unconditionally
  std::string attention = "gqa";             // "gqa" or "mla"
  // Qwen3-Next and Qwen3.5: Gated DeltaNet and gated full attention by layer_types, zero-centred RMSNorms
  // (1 + w), partial rotary embedding, and one shared expert scaled by sigmoid(shared_expert_gate).
  bool hybrid = false;
  bool split_linear_projections = false;  // Qwen3.5: in_proj_qkv, in_proj_z, in_proj_b, in_proj_a (Qwen3-Next: qkvz, ba)
  // DeepSeek-V2/V3 and GLM-4.5: first_k_dense_replace dense layers and n_shared_experts shared experts.
  bool dense_and_shared = false;
  // The router: "topk_softmax", or "aux_free" (sigmoid scores, top-k of scores + e_score_correction_bias).
  std::string router = "topk_softmax";
  std::string expert_bias_name;  // aux_free: where the correction bias is stored, after model.layers.N.
};

// The layout facts the tensor names depend on.
struct Layout {
  int64_t layers = 0, first_dense = 0, experts = 0;
  int64_t mtp_layers = 0;  // DeepSeek-V3: multi-token prediction depths, trained (core/src/mtp.cpp); HF layers layers + d
  bool shared_experts = false, q_lora = false;
  bool attention_bias = false;  // biases on q, k, v and o (GPT-OSS)
  bool qkv_bias = false;        // biases on q, k and v only (GLM-4.5)
  bool qk_norm = false;         // q_norm and k_norm (the architecture's qk_norm, or GLM-4.5's use_qk_norm)
  std::vector<bool> linear;     // hybrid: per layer, Gated DeltaNet (true) or full attention
  int64_t key_heads = 0, value_heads = 0, key_dim = 0, value_dim = 0;  // hybrid: the Gated DeltaNet sizes
};

const Architecture& architecture(const std::string& model_type, const std::string& where);

// A whole text file (config.json, the shard index); an error names the file.
std::string read_file(const std::filesystem::path& path);

// GPT-OSS stores each layer's experts fused: gate_up_proj [E, H, 2F] with gate and up interleaved
// along the last dimension (gate = 0::2, up = 1::2), down_proj [E, F, H], and their biases.
inline bool fused_experts(const Architecture& arch) { return arch.model_type == "gpt_oss"; }

inline std::string layer_prefix(int64_t layer) { return "model.layers." + std::to_string(layer) + "."; }

// PithTrain's prefix of Hugging Face layer `layer`: a main layer, or past them an MTP depth (core/src/mtp.cpp).
inline std::string our_layer_prefix(int64_t layer, const Layout& layout) {
  return layer < layout.layers ? "layers." + std::to_string(layer) + "." : "mtp_layers." + std::to_string(layer - layout.layers) + ".";
}

// (PithTrain name, Hugging Face name) of every tensor but the routed experts'.
std::vector<std::pair<std::string, std::string>> plain_names(const Layout& layout, const Architecture& arch);

// config.json of a Hugging Face folder, read as a PithTrain config.
struct ImportedConfig {
  const Architecture* arch = nullptr;
  Layout layout;
  std::string toml;                   // the whole config.toml
  std::string language_model_prefix;  // Qwen3.5's vision-language folder: "model.language_model."; else empty
  int64_t hidden_size = 0;
  int64_t skipped_mtp_layers = 0;     // GLM-4.5, MiniMax-M2: multi-token prediction layers after the main ones, not imported
};
ImportedConfig import_config(const std::string& hf_dir, const std::string& out_dir);

// Whether a tensor of the folder belongs to a multi-token prediction layer, which import skips (with a warning).
bool is_mtp_tensor(const ImportedConfig& imported, const std::string& name);

// A PithTrain config.toml, read for export: the layout of its tensors and the config.json to write.
struct ExportedConfig {
  const Architecture* arch = nullptr;
  Layout layout;
  std::string json;
};
ExportedConfig export_config(const std::string& config_path);

}  // namespace pithtrain::hf
