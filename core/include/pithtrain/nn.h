// Building blocks shared by the core and plugins: initialisation, RMSNorm, SwiGLU, rotary embeddings.
#pragma once
#include <vector>

#include "pithtrain/plugin.h"

namespace pithtrain {

// A new trainable tensor of `shape` drawn from N(0, std^2) with the context's dtype and device, using
// the global generator (seeded by the core), so construction order fixes the values.
at::Tensor normal_parameter(at::IntArrayRef shape, double std, const PluginContext& context);

// The routed experts' SwiGLU weights in the layout the `loop` and `grouped` experts share, so their
// weights are interchangeable: gate_proj, up_proj [E, F, H]; down_proj [E, H, F] (F = expert_hidden_size).
struct ExpertWeights {
  at::Tensor gate_proj, up_proj, down_proj;
  explicit ExpertWeights(const PluginContext& context);
  std::vector<Parameter> parameters() const;
};

// x * rsqrt(mean(x^2) + eps) * weight over the last dimension, computed in float32 (or double).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// down(silu(gate(x)) * up(x)) with weights gate/up [inner, hidden], down [hidden, inner].
at::Tensor swiglu(const at::Tensor& x, const at::Tensor& gate_proj, const at::Tensor& up_proj,
                  const at::Tensor& down_proj);

// Rotates x [batch, seq, heads, head_dim] by its positions [seq] (rotate-half convention, pairs
// (i, i + head_dim/2)) with frequencies theta^(-2i/head_dim).
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& positions, double theta);

// The same rotation with adjacent pairs (2i, 2i + 1), as complex numbers (DeepSeek's MLA convention).
at::Tensor apply_rope_interleaved(const at::Tensor& x, const at::Tensor& positions, double theta);

}  // namespace pithtrain
