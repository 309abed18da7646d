// Building blocks shared by the core and plugins: initialisation, RMSNorm, SwiGLU, rotary embeddings.
#pragma once
#include <deque>
#include <functional>
#include <string>
#include <vector>

#include "pithtrain/plugin.h"

namespace pithtrain {

// A new trainable tensor of `shape` drawn from N(0, std^2) with the context's dtype and device, using
// the global generator (seeded by the core), so construction order fixes the values.
at::Tensor normal_parameter(at::IntArrayRef shape, double std, const PluginContext& context);

// The routed experts' weights in the layout the `loop` and `grouped` experts share, so their weights
// are interchangeable: gate_proj, up_proj [E, F, H]; down_proj [E, H, F] (F = expert_hidden_size), and
// with `bias = true` gate_bias, up_bias [E, F], down_bias [E, H]. The experts table's keys:
//   activation = "swiglu"          silu(gate) * up
//              | "clamped_swiglu"  GPT-OSS: g = min(gate, limit), u = clamp(up, -limit, limit),
//                                  g * sigmoid(alpha * g) * (u + 1)
//   swiglu_alpha = 1.702, swiglu_limit = 7.0, bias = false
struct ExpertWeights {
  at::Tensor gate_proj, up_proj, down_proj;
  at::Tensor gate_bias, up_bias, down_bias;  // undefined unless bias = true
  std::string activation = "swiglu";
  double swiglu_alpha = 1.702, swiglu_limit = 7.0;
  ExpertWeights(Options& options, const PluginContext& context);
  // Expert `expert` on its tokens x [n, H] -> [n, H].
  at::Tensor apply(const at::Tensor& x, int64_t expert) const;
  // Every expert on its consecutive rows of x [N, H] (rows_per_expert[e] rows for expert e, in expert
  // order) -> [N, H]. The same arithmetic as apply per expert, but one autograd node splits x and one
  // per weight collects the experts' gradients, where apply's row slice and weight[e] would each add a
  // zero-filled full-size tensor per expert in the backward.
  at::Tensor apply_grouped(const at::Tensor& x, const std::vector<int64_t>& rows_per_expert) const;
  std::vector<Parameter> parameters() const;
};

// x * rsqrt(mean(x^2) + eps) * weight over the last dimension, computed in float32 (or double).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// The zero-centred RMSNorm of Qwen3-Next, Qwen3.5 and Gemma: x * rsqrt(mean(x^2) + eps) * (1 + weight),
// in float32 (or double) and then cast to x's dtype, so a weight near zero keeps its precision in bf16.
at::Tensor zero_centered_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// down(silu(gate(x)) * up(x)) with weights gate/up [inner, hidden], down [hidden, inner].
at::Tensor swiglu(const at::Tensor& x, const at::Tensor& gate_proj, const at::Tensor& up_proj,
                  const at::Tensor& down_proj);

// Rotary embedding settings: plain RoPE with frequencies theta^(-2i/d), or YaRN (arXiv:2309.00071),
// which divides the low frequencies by `factor`, keeps the high ones, blends linearly between the
// dimensions that turn beta_fast and beta_slow times over original_max_positions, and multiplies cos
// and sin by attention_factor.
struct Rope {
  double theta = 10000.0;
  std::string scaling = "none";  // "none" or "yarn"
  double factor = 1.0;
  int64_t original_max_positions = 4096;
  double beta_fast = 32.0, beta_slow = 1.0;
  bool truncate = true;          // round the blend range outwards to whole dimensions
  double attention_factor = 1.0;
};

// Reads the rotary keys of an attention plugin's table: rope_scaling ("none" | "yarn"), rope_factor,
// rope_original_max_positions, rope_beta_fast, rope_beta_slow, rope_truncate, rope_attention_factor
// (default for yarn: yarn_mscale(rope_factor, 1)). theta is the model's rope_theta.
Rope read_rope(Options& options, const ModelDims& dims);

// YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1).
double yarn_mscale(double factor, double mscale);

// Inverse frequencies [head_dim / 2] (float32, or float64 when `dtype` is double).
at::Tensor rope_inverse_frequency(int64_t head_dim, const Rope& rope, const at::TensorOptions& options);

// Rotates x [batch, seq, heads, head_dim] by its positions [seq] (rotate-half convention, pairs
// (i, i + head_dim/2)).
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& positions, const Rope& rope);

// The same rotation with adjacent pairs (2i, 2i + 1), as complex numbers (DeepSeek's MLA convention).
at::Tensor apply_rope_interleaved(const at::Tensor& x, const at::Tensor& positions, const Rope& rope);

// Context parallelism (PluginContext::context_group): causal attention of this rank's queries
// q [B, h, L, D] over the keys and values k, v [B, kv, L, D] of every rank of `group` (h a multiple of
// kv; query head i uses kv head i / (h / kv)). positions [L] are the global positions of this rank's
// tokens (any order; each rank may hold several chunks): key j is visible to query i when
// position_j <= position_i. Returns [B, h, L, D], equal to full causal attention over the whole
// sequence restricted to this rank's queries; differentiable. A collective over `group`.
at::Tensor ring_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                          Communicator& group);

// x [..., in] times weight [out, in] transposed, plus bias [out]: at::linear, except that once
// WeightGradientQueue::enable_deferral(true) was called, a weight that is a leaf (a parameter) may have
// its gradient left for later by a backward run inside WeightGradientQueue::defer. Use it for the
// model's matrix multiplies so zero-bubble pipeline schedules can split their backwards.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias = {});

// Deferred weight gradients, for schedules that split a backward into the input gradients (which the
// previous pipeline stage waits for) and the weight gradients (which can fill a bubble later).
class WeightGradientQueue {
 public:
  // Process-wide: while on, pithtrain::linear records forwards whose weight gradient can be deferred
  // (one custom autograd node per call); off, it is at::linear itself.
  static void enable_deferral(bool enabled);
  // Runs `backward` (a call of torch::autograd::backward); the weight gradients of the deferrable
  // linear layers it reaches are queued as one group instead of computed. Everything else, the
  // inputs' gradients included, is computed as usual.
  void defer(const std::function<void()>& backward);
  // Computes the oldest group's weight gradients and accumulates them into the parameters' .grad.
  void run_oldest();
  size_t pending() const { return groups_.size(); }

 private:
  std::deque<std::vector<std::function<void()>>> groups_;
};

}  // namespace pithtrain
