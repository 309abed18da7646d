// The gated delta rule in its chunked form, shared by gated_deltanet.cpp and its test.
#pragma once
#include <ATen/core/Tensor.h>

namespace pithtrain {

// Per head, the state S [dk, dv] starts at zero and for each token t
//   S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   out_t = S_t^T q_t,
// computed `chunk` tokens at a time (one triangular solve per chunk, then a scan over chunks).
// q, k [B, S, h, dk]; v [B, S, h, dv]; g (log decay, <= 0), beta [B, S, h] -> out [B, S, h, dv], in the
// inputs' dtype (float32 or float64). Differentiable.
at::Tensor chunked_gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                                    const at::Tensor& beta, int64_t chunk);

}  // namespace pithtrain
