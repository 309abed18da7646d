// Fused CPU kernels (cpu_kernels.cpp) behind pithtrain/kernels.h: float32 or float64 CPU tensors only
// (fusable()); differentiable.
#pragma once
#include <ATen/core/Tensor.h>

namespace pithtrain::kernels::cpu {

bool fusable(const at::Tensor& tensor);
// x [..., D] * rsqrt(mean(x^2) + eps) * weight [D].
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
// x [B, S, heads, D] rotated by cos, sin [S, D] (rotate-half convention).
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

}  // namespace pithtrain::kernels::cpu
