// Launchers of the MoE hot-path CUDA kernels (moe_kernels.cu). Plain C++: raw device pointers, row-major
// layouts, the CUDA stream as an opaque pointer; no torch headers on either side. dtype: 0 float32,
// 1 bfloat16 for the activations; indices are int64; routing works in float32.
#pragma once
#include <cstdint>

namespace pithtrain::cuda {

// SwiGLU over n elements: out = silu(gate) * up, or with clamped = true (GPT-OSS)
// g = min(gate, limit), u = clamp(up, -limit, limit), out = g * sigmoid(alpha * g) * (u + 1).
void swiglu_forward(int dtype, const void* gate, const void* up, void* out, int64_t n, bool clamped, float alpha, float limit,
                    void* stream);
// Its backward: grad_gate and grad_up from grad_out (same n elements).
void swiglu_backward(int dtype, const void* gate, const void* up, const void* grad_out, void* grad_gate, void* grad_up, int64_t n,
                     bool clamped, float alpha, float limit, void* stream);

// Token permutation by expert with slot_of [tokens, k]: the position of token t's j-th choice among
// the tokens * k rows sorted by expert. permute: out[slot_of[t, j]] = x[t] ([tokens, hidden] ->
// [tokens * k, hidden]); its backward is permute_backward: grad_x[t] = sum_j grad_out[slot_of[t, j]].
void permute_rows(int dtype, const void* x, const int64_t* slot_of, void* out, int64_t tokens, int64_t k, int64_t hidden, void* stream);
void permute_rows_backward(int dtype, const void* grad_out, const int64_t* slot_of, void* grad_x, int64_t tokens, int64_t k,
                           int64_t hidden, void* stream);
// Weighted combine back to token order: out[t] = sum_j weights[t, j] * y[slot_of[t, j]] (weights float32,
// accumulated in float32). Backward: grad_y[slot_of[t, j]] = weights[t, j] * grad_out[t] and
// grad_weights[t, j] = <grad_out[t], y[slot_of[t, j]]>.
void unpermute_combine(int dtype, const void* y, const int64_t* slot_of, const float* weights, void* out, int64_t tokens, int64_t k,
                       int64_t hidden, void* stream);
void unpermute_combine_backward(int dtype, const void* y, const int64_t* slot_of, const float* weights, const void* grad_out,
                                void* grad_y, float* grad_weights, int64_t tokens, int64_t k, int64_t hidden, void* stream);

// Routing of `tokens` rows of `experts` float32 logits: scores = softmax or sigmoid of the row; the k
// experts with the highest score + bias (bias may be null; ties go to the lower index) in descending
// order; their unbiased scores, divided by their sum (+1e-20) when renormalize, times scale.
// Outputs: scores [tokens, experts], expert_ids [tokens, k], weights [tokens, k]. experts <= 1024, k <= 32.
void route_topk(const float* logits, const float* bias, float* scores, int64_t* expert_ids, float* weights, int64_t tokens,
                int64_t experts, int64_t k, bool sigmoid, bool renormalize, float scale, void* stream);

}  // namespace pithtrain::cuda
