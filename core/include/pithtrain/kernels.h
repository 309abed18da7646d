// The hot-path operations with fused kernels (kernels/): CUDA tensors go to the CUDA kernels, float32
// and float64 CPU tensors to fused CPU kernels where one exists (rms_norm, rope), anything else
// to the reference, the plain ATen composition each is tested against (`*_reference`). All are
// differentiable unless stated.
#pragma once
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

namespace pithtrain::kernels {

// Whether this build compiled the CUDA kernels (nvcc was found); without them CUDA tensors take the
// reference path too.
bool cuda_kernels_built();

// silu(gate) * up; with clamped = true (GPT-OSS) g = min(gate, limit), u = clamp(up, -limit, limit),
// g * sigmoid(alpha * g) * (u + 1). gate, up: same shape, float32 or bfloat16.
at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up, bool clamped = false, double alpha = 1.702, double limit = 7.0);
at::Tensor swiglu_reference(const at::Tensor& gate, const at::Tensor& up, bool clamped = false, double alpha = 1.702, double limit = 7.0);

// x [..., D] * rsqrt(mean(x^2) + eps) * weight [D], computed in float32 (float64 for float64 inputs).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor rms_norm_reference(const at::Tensor& x, const at::Tensor& weight, double eps);

// Rotary embedding, rotate-half convention: x [B, S, heads, D] * cos + rotate(x) * sin, with cos, sin
// [S, D] (both halves, any attention factor applied) and rotate(x) = (-x[D/2:], x[:D/2]).
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor rope_reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// How many of ids (int64, any shape, each in [0, experts)) name each expert: int64 [experts], as
// at::bincount with that minimum length. On CUDA it compares every id with every expert instead, since
// at::bincount reads the largest id back to the host (a wait for the device in every MoE layer).
at::Tensor count_per_expert(const at::Tensor& ids, int64_t experts);

// slot_of [T, k] (int64) from expert_ids [T, k]: the position of token t's j-th choice when the T * k
// choices are sorted by expert (stably, so token order within an expert); tokens_per_expert [E] gets
// the counts. With `weights` [T, k], the unused choices (weight 0, pithtrain/router.h) sort after every
// used one and are not counted, so the used rows are the first tokens_per_expert.sum(). Not
// differentiable (indices).
at::Tensor slots_by_expert(const at::Tensor& expert_ids, int64_t experts, at::Tensor& tokens_per_expert,
                           const at::Tensor& weights = {});

// Token permutation: x [T, H] -> [T * k, H] with row slot_of[t, j] = x[t].
at::Tensor permute_rows(const at::Tensor& x, const at::Tensor& slot_of);
at::Tensor permute_rows_reference(const at::Tensor& x, const at::Tensor& slot_of);
// The weighted combine back: y [T * k, H], weights [T, k] float32 -> [T, H], row t = sum_j weights[t, j] *
// y[slot_of[t, j]] (accumulated in float32, or float64 for float64). Differentiable in y and weights.
at::Tensor unpermute_combine(const at::Tensor& y, const at::Tensor& slot_of, const at::Tensor& weights);
at::Tensor unpermute_combine_reference(const at::Tensor& y, const at::Tensor& slot_of, const at::Tensor& weights);

// Routing of logits [T, E]: scores = softmax or sigmoid (float32); the k experts with the highest
// score + bias (bias [E] or undefined; ties to the lower index), best first; their scores divided by
// their sum (+1e-20) when renormalize, times scale. `weights` is differentiable in the logits (the
// kernel picks the experts, autograd sees the same arithmetic as the reference); ids are not.
struct TopK {
  at::Tensor scores;      // [T, E] float32
  at::Tensor expert_ids;  // [T, k] int64
  at::Tensor weights;     // [T, k] float32
};
TopK route_topk(const at::Tensor& logits, const at::Tensor& bias, int64_t k, bool sigmoid, bool renormalize, double scale);
TopK route_topk_reference(const at::Tensor& logits, const at::Tensor& bias, int64_t k, bool sigmoid, bool renormalize, double scale);

// Grouped matrix multiply for the experts: x [N, H] holds counts[g] consecutive rows of group g
// (counts: int64 [G] on any device); weights [G, F, H]; returns [N, F], rows of group g times
// weights[g] transposed; rows after the last group (sum(counts) <= N: unused routing slots) are zero and
// get no gradient. CUDA bfloat16 with H and F multiples of 8 goes to grouped_mm_native, which
// reads no count on the host; everything else is one matrix multiply per group (cuBLAS on CUDA).
at::Tensor grouped_mm(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& counts);
at::Tensor grouped_mm_reference(const at::Tensor& x, const at::Tensor& weights, const std::vector<int64_t>& counts);
// LibTorch's grouped GEMM (at::_grouped_mm) with the groups' end rows computed on counts' device:
// float32 or bfloat16, H and F multiples of 8. grouped_mm uses it on CUDA (Hopper); LibTorch also
// runs it on the CPU, where its call is tested against the reference, backward included.
at::Tensor grouped_mm_native(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& counts);

// Mean cross-entropy of the logits hidden [N, H] x head [V, H] transposed against targets [N] (int64),
// computed chunk_rows rows at a time in float32 and recomputed the same way in the backward, so the
// [N, V] logits and their gradient never exist at once (any device; no CUDA kernel of its own).
at::Tensor chunked_cross_entropy(const at::Tensor& hidden, const at::Tensor& head, const at::Tensor& targets, int64_t chunk_rows);

}  // namespace pithtrain::kernels
