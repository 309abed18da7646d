// The decoder-only MoE transformer the core assembles from plugins (DESIGN.md, "Data flow").
// Dimension legend: B batch, S sequence, H hidden_size, V vocab_size, E experts, T = B * S tokens.
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "pithtrain/attention.h"
#include "pithtrain/experts.h"
#include "pithtrain/router.h"
#include "pithtrain/schedule.h"
#include "registry.h"

namespace pithtrain {

// One chosen component, for the start-up manifest.
struct ManifestEntry {
  std::string config_key;  // "model.moe.router.plugin"
  const LoadedPlugin* plugin;
  std::string layers = {};  // the layers it serves when not all of them ("0-2, 4-6": per-layer attention)
};

struct ModelOutput {
  at::Tensor logits;         // [B, S, V]
  at::Tensor loss;           // [] cross_entropy + aux_loss
  at::Tensor cross_entropy;  // []
  at::Tensor aux_loss;       // [] sum of the routers' losses
  std::vector<at::Tensor> tokens_per_expert;  // per MoE layer, [E] int64
  std::map<std::string, at::Tensor> router_loss_terms;  // per term name, summed over layers, detached []
  std::vector<at::Tensor> dropped_fraction;  // per MoE layer, [] (undefined when that router is dropless)
  std::vector<int64_t> routed_tokens;        // per MoE layer, the tokens it routed
  std::map<std::string, std::vector<at::Tensor>> router_statistics;  // Routing::statistics by name, one [] per layer
  // With [model] mtp_layers > 0 (mtp.cpp), in training forwards only: mtp_loss_coeff x the mean over depths of
  // mtp_cross_entropy, with its graph; `loss` includes it and `aux_loss` does not.
  at::Tensor mtp_loss;             // []
  at::Tensor mtp_cross_entropy;    // [] detached, the mean over depths of each depth's cross-entropy
};

struct DecoderLayer {
  at::Tensor attention_norm;  // [H]
  at::Tensor ffn_norm;        // [H]
  std::unique_ptr<Attention> attention;
  std::string attention_table = "attention";  // its table under [model], which also prefixes its parameters (layer_types)
  std::unique_ptr<Router> router;    // null on dense layers
  std::unique_ptr<Experts> experts;  // null on dense layers
  // The dense FFN on dense layers; the shared experts (fused into one SwiGLU) on MoE layers; else undefined.
  at::Tensor ffn_gate_proj, ffn_up_proj, ffn_down_proj;  // [inner, H], [inner, H], [H, inner]
  at::Tensor shared_expert_gate;  // [1, H] with [model.moe] shared_expert_gate: sigmoid(x g^T) scales the shared experts
};

// A decoder layer's parameters, named `prefix` + attention_norm.weight, attention.q_proj, router.gate.weight, ...
void append_layer_parameters(const DecoderLayer& layer, const std::string& prefix, std::vector<Parameter>& result);

// One multi-token prediction depth (DeepSeek-V3 report, section 2.2; mtp.cpp): its own norms, projection and
// decoder layer; the embedding and the LM head are the main model's.
struct MtpDepth {
  at::Tensor enorm, hnorm;  // [H] RMSNorm of the next token's embedding, of the previous depth's hidden state
  at::Tensor eh_proj;       // [H, 2H] over [enorm(embedding); hnorm(hidden)]
  DecoderLayer layer;
  at::Tensor final_norm;    // [H] before the shared LM head (Hugging Face: shared_head.norm)
};

class Model {
 public:
  // Reads the [model] table of `options`, loads the chosen plugins through `registry` and builds one
  // instance per layer. `context` supplies device, dtype and logger; its dims are filled here.
  Model(Options options, PluginRegistry& registry, PluginContext context);

  // tokens [B, S + 1] int64: inputs are tokens[:, :-1], targets tokens[:, 1:]. The optional callbacks
  // bracket each unit (a fully sharded schedule gathers and frees its parameters there).
  ModelOutput forward(const at::Tensor& tokens, const std::function<void(int64_t)>& gather_unit = {},
                      const std::function<void(int64_t)>& release_unit = {});
  // The forward as a chain of units (StepFunctions::units): 0 the embedding, 1..L the decoder layers,
  // L + 1 the final norm, LM head and cross-entropy. `input` is the previous unit's output; the routing
  // statistics and, for the last unit, logits and cross_entropy go to `output`.
  UnitOutput forward_unit(int64_t unit, const at::Tensor& input, const at::Tensor& tokens, ModelOutput& output);
  int64_t num_units() const { return static_cast<int64_t>(layers_.size()) + 2; }
  // Context parallelism: this rank (of `size`) runs the tokens of chunks rank and 2 x size - 1 - rank of
  // every sequence; token_positions(seq) are their positions (all of 0..seq-1 when size = 1).
  void set_context_split(int64_t rank, int64_t size) { context_rank_ = rank, context_size_ = size; }
  // > 0: the head's cross-entropy is computed this many tokens at a time, never holding the whole
  // [tokens, vocab] logits and their gradient (output.logits then stays undefined).
  void set_loss_chunk_tokens(int64_t tokens) { loss_chunk_tokens_ = tokens; }
  at::Tensor token_positions(int64_t seq) const;
  // The first attention table whose plugin cannot split sequences over ranks, as {plugin name, config key};
  // empty names when every layer's can (Attention::supports_context_parallel).
  std::pair<std::string, std::string> attention_without_context_parallel() const;
  // The unit a parameter (by its name in parameters()) belongs to.
  int64_t unit_of(const std::string& parameter_name) const;
  // The MoE layer index (among MoE layers) of a decoder-layer unit; -1 for other units and dense layers.
  int64_t moe_layer_of_unit(int64_t unit) const;
  std::vector<Parameter> parameters() const;
  // Parameters and router buffers, by name: what a model file holds.
  std::vector<NamedTensor> state() const;
  void after_optimizer_step();
  // Whether a router wants the step's expert counts (Router::needs_step_counts), and handing them over:
  // one [E] tensor per MoE layer, or an empty vector to clear them.
  bool needs_step_counts() const;
  // Whether a layer's router picks a varying number of experts per token (Router::variable_experts_per_token).
  bool variable_experts_per_token() const;
  void set_step_counts(const std::vector<at::Tensor>& tokens_per_expert);

  // Generation (defined in generate.cpp): the logits [B, V] of the token after tokens [B, S], which
  // follow the caches' tokens (one cache per layer, every layer's Attention::forward_cached), or, with
  // caches null, are the whole prefix (every layer's forward() from position 0). No gradients; the
  // caches' lengths advance by S.
  at::Tensor next_token_logits(const at::Tensor& tokens, std::vector<AttentionCache>* caches);
  // Whether every layer's attention has a cache path (Attention::supports_cache).
  bool attention_supports_cache() const;
  // The plugin name of the first attention table whose plugin has no cache path ("" when every one has).
  std::string attention_without_cache() const;

  // Training FLOPs per token (forward + backward) for MFU: 6 x the matmul parameters a token uses
  // (top_k of the routed experts) + 6 x layers x seq x heads x head_dim for causal attention, counted on the
  // layers of [model.attention] (a linear-attention type's recurrence is left out).
  double flops_per_token(int64_t seq_len) const;
  // Each MoE layer's router buffers (e.g. the aux_free bias), for diagnostics.
  std::vector<std::vector<NamedTensor>> router_buffers() const;

  const ModelDims& dims() const { return context_.dims; }
  const std::vector<ManifestEntry>& manifest() const { return manifest_; }
  int64_t num_moe_layers() const;
  // [model] mtp_layers: the multi-token prediction depths, which run in the last unit (mtp.cpp).
  int64_t mtp_layers() const { return static_cast<int64_t>(mtp_.size()); }

 private:
  // One decoder layer on `input` [B, S, H] at `positions` [S]; the router's figures go to `output` when
  // `record_routing` (the main layers; an MTP layer adds only its loss terms). With `cache` the attention
  // runs its cache path (generation, generate.cpp). Returns the new hidden state.
  at::Tensor forward_layer(DecoderLayer& layer, int64_t index, const at::Tensor& input, const at::Tensor& positions,
                           ModelOutput& output, at::Tensor& aux_loss, bool record_routing, AttentionCache* cache = nullptr);
  // mtp.cpp: the depths' loss from the main model's last hidden state `hidden` [B, S, H] (before the final norm)
  // and tokens [B, S + 1]; sets output.mtp_loss and output.mtp_cross_entropy and returns mtp_loss plus the MTP
  // layers' router losses [].
  at::Tensor forward_mtp(const at::Tensor& hidden, const at::Tensor& tokens, ModelOutput& output);
  // mtp.cpp: the depths' parameters, named mtp_layers.<depth>.<name>.
  void append_mtp_parameters(std::vector<Parameter>& result) const;

  void check_router_loss(const Routing& routing, int64_t layer) const;
  // The layer and final RMSNorm: x_hat * weight, or x_hat * (1 + weight) with norm_zero_centered.
  at::Tensor norm(const at::Tensor& x, const at::Tensor& weight) const;

  PluginContext context_;
  bool router_checked_ = false;
  int64_t context_rank_ = 0, context_size_ = 1;
  int64_t loss_chunk_tokens_ = 0;  // the first training forward checks each router's loss terms
  double norm_eps_ = 1e-5;
  bool norm_zero_centered_ = false;  // the layer and final norms scale by 1 + weight (Qwen3-Next)
  int64_t first_dense_layers_ = 0, dense_hidden_size_ = 0, shared_experts_ = 0;
  int64_t full_attention_layers_ = 0;  // layers of [model.attention], the ones with causal attention scores
  at::Tensor embedding_;   // [V, H]
  std::vector<DecoderLayer> layers_;
  at::Tensor final_norm_;  // [H]
  at::Tensor lm_head_;     // [V, H]
  std::vector<MtpDepth> mtp_;  // [model] mtp_layers depths (empty: no multi-token prediction)
  double mtp_loss_coeff_ = 0.3;
  std::vector<ManifestEntry> manifest_;
};

}  // namespace pithtrain
