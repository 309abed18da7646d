// CUDA kernels of the MoE hot path (declared in moe_kernels.h): SwiGLU, token permutation by expert and
// the weighted combine back, and top-k routing. Raw pointers only; at::Tensor wrappers and the CPU
// references they are tested against live in kernels.cpp.
#include "moe_kernels.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <type_traits>
#include <string>

namespace pithtrain::cuda {
namespace {

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16(v); }
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + __expf(-x)); }

void check(const char* what) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(error));
}

int blocks_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 65535 * 32 ? (blocks > 0 ? blocks : 1) : 65535 * 32);
}

template <typename T>
__global__ void swiglu_forward_kernel(const T* gate, const T* up, T* out, int64_t n, bool clamped, float alpha, float limit) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float g = load(gate, i), u = load(up, i);
    if (clamped) {
      g = fminf(g, limit);
      u = fminf(fmaxf(u, -limit), limit);
      store(out, i, g * sigmoid(alpha * g) * (u + 1.0f));
    } else {
      store(out, i, g * sigmoid(g) * u);
    }
  }
}

template <typename T>
__global__ void swiglu_backward_kernel(const T* gate, const T* up, const T* grad_out, T* grad_gate, T* grad_up, int64_t n, bool clamped,
                                       float alpha, float limit) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = load(gate, i), u = load(up, i), d = load(grad_out, i);
    if (clamped) {
      // Gradients pass where the clamps do not bind (bounds included, as at::clamp's).
      const float gc = fminf(g, limit), uc = fminf(fmaxf(u, -limit), limit);
      const float s = sigmoid(alpha * gc), f = gc * s, df = s + alpha * gc * s * (1.0f - s);
      store(grad_gate, i, g <= limit ? d * (uc + 1.0f) * df : 0.0f);
      store(grad_up, i, (u >= -limit && u <= limit) ? d * f : 0.0f);
    } else {
      const float s = sigmoid(g), silu = g * s;
      store(grad_gate, i, d * u * s * (1.0f + g * (1.0f - s)));
      store(grad_up, i, d * silu);
    }
  }
}

// One block per (token, choice) row; threads over the hidden dimension.
template <typename T>
__global__ void permute_kernel(const T* x, const int64_t* slot_of, T* out, int64_t k, int64_t hidden) {
  const int64_t row = blockIdx.x, token = row / k;
  const int64_t slot = slot_of[row];
  for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) store(out, slot * hidden + h, load(x, token * hidden + h));
}

// One block per token: the sum of its k rows.
template <typename T>
__global__ void permute_backward_kernel(const T* grad_out, const int64_t* slot_of, T* grad_x, int64_t k, int64_t hidden) {
  const int64_t token = blockIdx.x;
  for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) {
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) sum += load(grad_out, slot_of[token * k + j] * hidden + h);
    store(grad_x, token * hidden + h, sum);
  }
}

template <typename T>
__global__ void combine_kernel(const T* y, const int64_t* slot_of, const float* weights, T* out, int64_t k, int64_t hidden) {
  const int64_t token = blockIdx.x;
  for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) {
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) sum += weights[token * k + j] * load(y, slot_of[token * k + j] * hidden + h);
    store(out, token * hidden + h, sum);
  }
}

// One block of 256 threads per (token, choice): its row of grad_y and, by a block reduction, its weight's gradient.
template <typename T>
__global__ void combine_backward_kernel(const T* y, const int64_t* slot_of, const float* weights, const T* grad_out, T* grad_y,
                                        float* grad_weights, int64_t k, int64_t hidden) {
  __shared__ float partial[256];
  const int64_t row = blockIdx.x, token = row / k, slot = slot_of[row];
  const float weight = weights[row];
  float dot = 0.0f;
  for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) {
    const float d = load(grad_out, token * hidden + h);
    store(grad_y, slot * hidden + h, weight * d);
    dot += d * load(y, slot * hidden + h);
  }
  partial[threadIdx.x] = dot;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) grad_weights[row] = partial[0];
}

// One thread per token. Selection pass p takes the best (value, index) strictly after pass p - 1's in
// the order "higher value first, then lower index", so ties go to the lower index without a mark array.
__global__ void route_topk_kernel(const float* logits, const float* bias, float* scores, int64_t* expert_ids, float* weights,
                                  int64_t tokens, int64_t experts, int64_t k, bool use_sigmoid, bool renormalize, float scale) {
  const int64_t token = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (token >= tokens) return;
  const float* row = logits + token * experts;
  float* score_row = scores + token * experts;
  if (use_sigmoid) {
    for (int64_t e = 0; e < experts; ++e) score_row[e] = sigmoid(row[e]);
  } else {
    float top = -INFINITY, total = 0.0f;
    for (int64_t e = 0; e < experts; ++e) top = fmaxf(top, row[e]);
    for (int64_t e = 0; e < experts; ++e) total += __expf(row[e] - top);
    for (int64_t e = 0; e < experts; ++e) score_row[e] = __expf(row[e] - top) / total;
  }
  float previous_value = INFINITY, chosen_sum = 0.0f;
  int64_t previous_index = -1;
  for (int64_t pick = 0; pick < k; ++pick) {
    float best_value = -INFINITY;
    int64_t best_index = -1;
    for (int64_t e = 0; e < experts; ++e) {
      const float value = score_row[e] + (bias != nullptr ? bias[e] : 0.0f);
      const bool after_previous = value < previous_value || (value == previous_value && e > previous_index);
      if (after_previous && (best_index < 0 || value > best_value)) best_value = value, best_index = e;
    }
    expert_ids[token * k + pick] = best_index;
    weights[token * k + pick] = score_row[best_index];
    chosen_sum += score_row[best_index];
    previous_value = best_value, previous_index = best_index;
  }
  for (int64_t pick = 0; pick < k; ++pick) {
    float w = weights[token * k + pick];
    if (renormalize) w = w / (chosen_sum + 1e-20f);
    weights[token * k + pick] = w * scale;
  }
}

template <typename F>
void by_dtype(int dtype, F&& launch) {
  if (dtype == 0) launch(static_cast<float*>(nullptr));
  else if (dtype == 1) launch(static_cast<__nv_bfloat16*>(nullptr));
  else throw std::runtime_error("moe kernels: dtype must be 0 (float32) or 1 (bfloat16)");
}

}  // namespace

void swiglu_forward(int dtype, const void* gate, const void* up, void* out, int64_t n, bool clamped, float alpha, float limit, void* stream) {
  if (n == 0) return;
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    swiglu_forward_kernel<T><<<blocks_for(n, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(out), n, clamped, alpha, limit);
  });
  check("swiglu_forward");
}

void swiglu_backward(int dtype, const void* gate, const void* up, const void* grad_out, void* grad_gate, void* grad_up, int64_t n,
                     bool clamped, float alpha, float limit, void* stream) {
  if (n == 0) return;
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    swiglu_backward_kernel<T><<<blocks_for(n, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<const T*>(grad_out), static_cast<T*>(grad_gate),
        static_cast<T*>(grad_up), n, clamped, alpha, limit);
  });
  check("swiglu_backward");
}

void permute_rows(int dtype, const void* x, const int64_t* slot_of, void* out, int64_t tokens, int64_t k, int64_t hidden, void* stream) {
  if (tokens * k == 0) return;
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    permute_kernel<T><<<static_cast<unsigned>(tokens * k), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), slot_of, static_cast<T*>(out), k, hidden);
  });
  check("permute_rows");
}

void permute_rows_backward(int dtype, const void* grad_out, const int64_t* slot_of, void* grad_x, int64_t tokens, int64_t k,
                           int64_t hidden, void* stream) {
  if (tokens == 0) return;
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    permute_backward_kernel<T><<<static_cast<unsigned>(tokens), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(grad_out), slot_of, static_cast<T*>(grad_x), k, hidden);
  });
  check("permute_rows_backward");
}

void unpermute_combine(int dtype, const void* y, const int64_t* slot_of, const float* weights, void* out, int64_t tokens, int64_t k,
                       int64_t hidden, void* stream) {
  if (tokens == 0) return;
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    combine_kernel<T><<<static_cast<unsigned>(tokens), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(y), slot_of, weights, static_cast<T*>(out), k, hidden);
  });
  check("unpermute_combine");
}

void unpermute_combine_backward(int dtype, const void* y, const int64_t* slot_of, const float* weights, const void* grad_out,
                                void* grad_y, float* grad_weights, int64_t tokens, int64_t k, int64_t hidden, void* stream) {
  if (tokens * k == 0) return;
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    combine_backward_kernel<T><<<static_cast<unsigned>(tokens * k), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(y), slot_of, weights, static_cast<const T*>(grad_out), static_cast<T*>(grad_y), grad_weights, k, hidden);
  });
  check("unpermute_combine_backward");
}

void route_topk(const float* logits, const float* bias, float* scores, int64_t* expert_ids, float* weights, int64_t tokens,
                int64_t experts, int64_t k, bool sigmoid, bool renormalize, float scale, void* stream) {
  if (tokens == 0) return;
  if (experts > 1024 || k > 32 || k > experts) throw std::runtime_error("route_topk: needs experts <= 1024 and k <= min(32, experts)");
  route_topk_kernel<<<blocks_for(tokens, 128), 128, 0, static_cast<cudaStream_t>(stream)>>>(logits, bias, scores, expert_ids, weights,
                                                                                         tokens, experts, k, sigmoid, renormalize, scale);
  check("route_topk");
}

}  // namespace pithtrain::cuda
