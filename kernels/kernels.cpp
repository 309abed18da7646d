// at::Tensor wrappers of the MoE kernels (pithtrain/kernels.h): autograd functions that send CUDA
// tensors to the raw-pointer kernels of moe_kernels.cu, and the plain ATen references every other
// tensor takes and the kernels are tested against.
#include "pithtrain/kernels.h"

#include <algorithm>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#ifdef PITHTRAIN_CUDA_KERNELS
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "moe_kernels.h"
#endif

#include "cpu_kernels.h"
#include "pithtrain/error.h"

namespace pithtrain::kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

#ifdef PITHTRAIN_CUDA_KERNELS
bool on_kernel(const at::Tensor& tensor) {
  return tensor.is_cuda() && (tensor.scalar_type() == at::kFloat || tensor.scalar_type() == at::kBFloat16);
}
int dtype_code(const at::Tensor& tensor) { return tensor.scalar_type() == at::kFloat ? 0 : 1; }
void* stream_of(const at::Tensor& tensor) { return c10::cuda::getCurrentCUDAStream(tensor.device().index()).stream(); }

struct SwiGluFunction : public torch::autograd::Function<SwiGluFunction> {
  static at::Tensor forward(AutogradContext* context, const at::Tensor& gate, const at::Tensor& up, bool clamped, double alpha, double limit) {
    const c10::cuda::CUDAGuard guard(gate.device());
    const at::Tensor g = gate.contiguous(), u = up.contiguous();
    at::Tensor out = at::empty_like(g);
    cuda::swiglu_forward(dtype_code(g), g.data_ptr(), u.data_ptr(), out.data_ptr(), g.numel(), clamped, static_cast<float>(alpha),
                         static_cast<float>(limit), stream_of(g));
    context->save_for_backward({g, u});
    context->saved_data["clamped"] = clamped;
    context->saved_data["alpha"] = alpha;
    context->saved_data["limit"] = limit;
    return out;
  }
  static tensor_list backward(AutogradContext* context, tensor_list grads) {
    const auto saved = context->get_saved_variables();
    const at::Tensor& g = saved[0];
    const c10::cuda::CUDAGuard guard(g.device());
    const at::Tensor grad_out = grads[0].contiguous();
    at::Tensor grad_gate = at::empty_like(g), grad_up = at::empty_like(g);
    cuda::swiglu_backward(dtype_code(g), g.data_ptr(), saved[1].data_ptr(), grad_out.data_ptr(), grad_gate.data_ptr(), grad_up.data_ptr(),
                          g.numel(), context->saved_data["clamped"].toBool(), static_cast<float>(context->saved_data["alpha"].toDouble()),
                          static_cast<float>(context->saved_data["limit"].toDouble()), stream_of(g));
    return {grad_gate, grad_up, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct PermuteFunction : public torch::autograd::Function<PermuteFunction> {
  static at::Tensor forward(AutogradContext* context, const at::Tensor& x, const at::Tensor& slot_of) {
    const c10::cuda::CUDAGuard guard(x.device());
    const at::Tensor rows = x.contiguous(), slots = slot_of.contiguous();
    const int64_t tokens = rows.size(0), k = slots.size(1), hidden = rows.size(1);
    at::Tensor out = at::empty({tokens * k, hidden}, rows.options());
    cuda::permute_rows(dtype_code(rows), rows.data_ptr(), slots.data_ptr<int64_t>(), out.data_ptr(), tokens, k, hidden, stream_of(rows));
    context->save_for_backward({slots});
    return out;
  }
  static tensor_list backward(AutogradContext* context, tensor_list grads) {
    const at::Tensor slots = context->get_saved_variables()[0];
    const at::Tensor grad_out = grads[0].contiguous();
    const c10::cuda::CUDAGuard guard(grad_out.device());
    const int64_t tokens = slots.size(0), k = slots.size(1), hidden = grad_out.size(1);
    at::Tensor grad_x = at::empty({tokens, hidden}, grad_out.options());
    cuda::permute_rows_backward(dtype_code(grad_out), grad_out.data_ptr(), slots.data_ptr<int64_t>(), grad_x.data_ptr(), tokens, k, hidden,
                                stream_of(grad_out));
    return {grad_x, at::Tensor()};
  }
};

struct CombineFunction : public torch::autograd::Function<CombineFunction> {
  static at::Tensor forward(AutogradContext* context, const at::Tensor& y, const at::Tensor& slot_of, const at::Tensor& weights) {
    const c10::cuda::CUDAGuard guard(y.device());
    const at::Tensor rows = y.contiguous(), slots = slot_of.contiguous(), w = weights.to(at::kFloat).contiguous();
    const int64_t tokens = slots.size(0), k = slots.size(1), hidden = rows.size(1);
    at::Tensor out = at::empty({tokens, hidden}, rows.options());
    cuda::unpermute_combine(dtype_code(rows), rows.data_ptr(), slots.data_ptr<int64_t>(), w.data_ptr<float>(), out.data_ptr(), tokens, k,
                            hidden, stream_of(rows));
    context->save_for_backward({rows, slots, w});
    context->saved_data["weights_dtype"] = static_cast<int64_t>(weights.scalar_type());
    return out;
  }
  static tensor_list backward(AutogradContext* context, tensor_list grads) {
    const auto saved = context->get_saved_variables();
    const at::Tensor &rows = saved[0], &slots = saved[1], &w = saved[2];
    const c10::cuda::CUDAGuard guard(rows.device());
    const at::Tensor grad_out = grads[0].contiguous();
    const int64_t tokens = slots.size(0), k = slots.size(1), hidden = rows.size(1);
    at::Tensor grad_y = at::empty_like(rows), grad_w = at::empty({tokens, k}, w.options());
    cuda::unpermute_combine_backward(dtype_code(rows), rows.data_ptr(), slots.data_ptr<int64_t>(), w.data_ptr<float>(), grad_out.data_ptr(),
                                     grad_y.data_ptr(), grad_w.data_ptr<float>(), tokens, k, hidden, stream_of(rows));
    const auto weights_dtype = static_cast<at::ScalarType>(context->saved_data["weights_dtype"].toInt());
    return {grad_y, at::Tensor(), grad_w.to(weights_dtype)};
  }
};
#endif

// Chunked cross-entropy: the forward keeps only each row's log-sum-exp; the backward recomputes each
// chunk's logits.
struct ChunkedCrossEntropyFunction : public torch::autograd::Function<ChunkedCrossEntropyFunction> {
  static at::Tensor forward(AutogradContext* context, const at::Tensor& hidden, const at::Tensor& head, const at::Tensor& targets,
                            int64_t chunk_rows) {
    const int64_t rows = hidden.size(0);
    const auto compute = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor total = at::zeros({}, hidden.options().dtype(compute));
    for (int64_t first = 0; first < rows; first += chunk_rows) {
      const int64_t count = std::min(chunk_rows, rows - first);
      at::Tensor logits = at::matmul(hidden.narrow(0, first, count), head.t()).to(compute);  // [n, V]
      at::Tensor picked = logits.gather(1, targets.narrow(0, first, count).unsqueeze(1)).squeeze(1);
      total += (at::logsumexp(logits, 1) - picked).sum();
    }
    context->save_for_backward({hidden, head, targets});
    context->saved_data["chunk_rows"] = chunk_rows;
    return total / static_cast<double>(std::max<int64_t>(rows, 1));
  }
  static tensor_list backward(AutogradContext* context, tensor_list grads) {
    const auto saved = context->get_saved_variables();
    const at::Tensor &hidden = saved[0], &head = saved[1], &targets = saved[2];
    const int64_t rows = hidden.size(0), chunk_rows = context->saved_data["chunk_rows"].toInt();
    const auto compute = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const at::Tensor scale = grads[0].to(compute) / static_cast<double>(std::max<int64_t>(rows, 1));
    at::Tensor grad_hidden = at::empty_like(hidden), grad_head = at::zeros(head.sizes(), head.options().dtype(compute));
    for (int64_t first = 0; first < rows; first += chunk_rows) {
      const int64_t count = std::min(chunk_rows, rows - first);
      const at::Tensor part = hidden.narrow(0, first, count);
      at::Tensor probabilities = at::softmax(at::matmul(part, head.t()).to(compute), 1);  // [n, V]
      probabilities.scatter_add_(1, targets.narrow(0, first, count).unsqueeze(1),
                                 at::full({count, 1}, -1.0, probabilities.options()));
      const at::Tensor grad_logits = (probabilities * scale).to(hidden.scalar_type());  // [n, V]
      grad_hidden.narrow(0, first, count).copy_(at::matmul(grad_logits, head));
      grad_head += at::matmul(grad_logits.t(), part).to(compute);
    }
    return {grad_hidden, grad_head.to(head.scalar_type()), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

bool cuda_kernels_built() {
#ifdef PITHTRAIN_CUDA_KERNELS
  return true;
#else
  return false;
#endif
}

at::Tensor swiglu_reference(const at::Tensor& gate, const at::Tensor& up, bool clamped, double alpha, double limit) {
  if (!clamped) return at::silu(gate) * up;
  const at::Tensor g = at::clamp_max(gate, limit), u = at::clamp(up, -limit, limit);
  return g * at::sigmoid(g * alpha) * (u + 1);
}

at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up, bool clamped, double alpha, double limit) {
#ifdef PITHTRAIN_CUDA_KERNELS
  if (on_kernel(gate) && up.scalar_type() == gate.scalar_type() && up.sizes() == gate.sizes())
    return SwiGluFunction::apply(gate, up, clamped, alpha, limit);
#endif
  return swiglu_reference(gate, up, clamped, alpha, limit);
}

at::Tensor rms_norm_reference(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor x32 = x.scalar_type() == at::kDouble ? x : x.to(at::kFloat);
  const at::Tensor normalized = x32 * at::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return normalized.to(x.scalar_type()) * weight;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (cpu::fusable(x) && weight.scalar_type() == x.scalar_type() && weight.dim() == 1 && x.size(-1) == weight.size(0))
    return cpu::rms_norm(x, weight, eps);
  return rms_norm_reference(x, weight, eps);
}

at::Tensor rope_reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  const at::Tensor rotated = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos.unsqueeze(0).unsqueeze(2) + rotated * sin.unsqueeze(0).unsqueeze(2);
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  if (cpu::fusable(x) && x.dim() == 4 && cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type() &&
      cos.dim() == 2 && cos.size(0) == x.size(1) && cos.size(1) == x.size(3) && x.size(3) % 2 == 0)
    return cpu::rope(x, cos, sin);
  return rope_reference(x, cos, sin);
}

at::Tensor count_per_expert(const at::Tensor& ids, int64_t experts) {
  const at::Tensor flat = ids.reshape(-1);                                            // [N]
  if (!flat.is_cuda()) return at::bincount(flat, {}, experts);
  return (flat.unsqueeze(1) == at::arange(experts, flat.options())).sum(0);  // [E], int64 (a sum of bools)
}

at::Tensor slots_by_expert(const at::Tensor& expert_ids, int64_t experts, at::Tensor& tokens_per_expert, const at::Tensor& weights) {
  at::Tensor flat = expert_ids.reshape(-1);                                                // [T * k]
  // Unused choices as a sentinel expert `experts`: sorted last, cut off the counts.
  if (weights.defined()) flat = flat.masked_fill(weights.detach().reshape(-1) == 0, experts);
  const at::Tensor order = std::get<1>(at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false));  // sorted position -> choice
  at::Tensor slots = at::empty_like(order);
  slots.index_put_({order}, at::arange(order.numel(), order.options()));                  // choice -> sorted position
  tokens_per_expert = weights.defined() ? count_per_expert(flat, experts + 1).narrow(0, 0, experts).contiguous()
                                        : count_per_expert(flat, experts);
  return slots.view(expert_ids.sizes());
}

at::Tensor permute_rows_reference(const at::Tensor& x, const at::Tensor& slot_of) {
  const int64_t k = slot_of.size(1);
  // Row slot_of[t, j] of the result is x[t]: gather the inverse permutation.
  at::Tensor source = at::empty({slot_of.numel()}, slot_of.options());
  source.index_put_({slot_of.reshape(-1)}, at::arange(slot_of.numel(), slot_of.options()).div(k, "floor"));
  return x.index_select(0, source);
}

at::Tensor permute_rows(const at::Tensor& x, const at::Tensor& slot_of) {
#ifdef PITHTRAIN_CUDA_KERNELS
  if (on_kernel(x) && x.dim() == 2) return PermuteFunction::apply(x, slot_of);
#endif
  return permute_rows_reference(x, slot_of);
}

at::Tensor unpermute_combine_reference(const at::Tensor& y, const at::Tensor& slot_of, const at::Tensor& weights) {
  const int64_t tokens = slot_of.size(0), k = slot_of.size(1);
  const at::Tensor rows = y.index_select(0, slot_of.reshape(-1)).view({tokens, k, -1});  // [T, k, H]
  const auto compute = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;  // at least float32, as the kernel
  return (rows.to(compute) * weights.to(compute).unsqueeze(-1)).sum(1).to(y.scalar_type());
}

at::Tensor unpermute_combine(const at::Tensor& y, const at::Tensor& slot_of, const at::Tensor& weights) {
#ifdef PITHTRAIN_CUDA_KERNELS
  if (on_kernel(y) && y.dim() == 2) return CombineFunction::apply(y, slot_of, weights);
#endif
  return unpermute_combine_reference(y, slot_of, weights);
}

namespace {
// The differentiable part of routing, shared by both paths: scores and the chosen experts' weights.
at::Tensor routing_scores(const at::Tensor& logits, bool sigmoid) {
  const at::Tensor x = logits.to(at::kFloat);
  return sigmoid ? at::sigmoid(x) : at::softmax(x, -1);
}
at::Tensor routing_weights(const at::Tensor& scores, const at::Tensor& expert_ids, bool renormalize, double scale) {
  at::Tensor weights = scores.gather(1, expert_ids);
  if (renormalize) weights = weights / (weights.sum(-1, /*keepdim=*/true) + 1e-20);
  return weights * scale;
}
}  // namespace

TopK route_topk_reference(const at::Tensor& logits, const at::Tensor& bias, int64_t k, bool sigmoid, bool renormalize, double scale) {
  TopK result;
  result.scores = routing_scores(logits, sigmoid);
  at::Tensor for_choice = bias.defined() ? result.scores.detach() + bias.to(at::kFloat) : result.scores.detach();
  // at::topk does not promise which of equal values comes first: a stable descending sort does (lower index first).
  result.expert_ids = std::get<1>(at::sort(for_choice, /*stable=*/true, /*dim=*/-1, /*descending=*/true)).narrow(1, 0, k).contiguous();
  result.weights = routing_weights(result.scores, result.expert_ids, renormalize, scale);
  return result;
}

TopK route_topk(const at::Tensor& logits, const at::Tensor& bias, int64_t k, bool sigmoid, bool renormalize, double scale) {
#ifdef PITHTRAIN_CUDA_KERNELS
  if (logits.is_cuda() && logits.dim() == 2) {
    const c10::cuda::CUDAGuard guard(logits.device());
    const at::Tensor x = logits.detach().to(at::kFloat).contiguous();
    const int64_t tokens = x.size(0), experts = x.size(1);
    const at::Tensor b = bias.defined() ? bias.detach().to(at::kFloat).contiguous() : at::Tensor();
    TopK result;
    at::Tensor scores = at::empty_like(x), weights = at::empty({tokens, k}, x.options());
    result.expert_ids = at::empty({tokens, k}, x.options().dtype(at::kLong));
    cuda::route_topk(x.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr, scores.data_ptr<float>(),
                     result.expert_ids.data_ptr<int64_t>(), weights.data_ptr<float>(), tokens, experts, k, sigmoid, renormalize,
                     static_cast<float>(scale), stream_of(x));
    if (at::GradMode::is_enabled() && logits.requires_grad()) {
      // Training: the kernel chose the experts; the weights go through autograd like the reference's.
      result.scores = routing_scores(logits, sigmoid);
      result.weights = routing_weights(result.scores, result.expert_ids, renormalize, scale);
    } else {
      result.scores = scores, result.weights = weights;
    }
    return result;
  }
#endif
  return route_topk_reference(logits, bias, k, sigmoid, renormalize, scale);
}

at::Tensor grouped_mm_reference(const at::Tensor& x, const at::Tensor& weights, const std::vector<int64_t>& counts) {
  std::vector<at::Tensor> parts;
  int64_t offset = 0;
  for (size_t group = 0; group < counts.size(); ++group) {
    if (counts[group] > 0) parts.push_back(at::matmul(x.narrow(0, offset, counts[group]), weights[group].t()));
    offset += counts[group];
  }
  if (parts.empty()) return at::zeros({0, weights.size(1)}, x.options());
  return at::cat(parts, 0);
}

at::Tensor grouped_mm_native(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& counts) {
  const at::Tensor ends = counts.to(x.device()).cumsum(0).to(at::kInt);  // [G], int32: what the GEMM takes
  // Rows after the last group (unused routing slots) are not computed: the GEMM leaves them unwritten, so
  // they are zeroed here, and the input is masked too so that their unwritten input gradient is dropped.
  // Selected, not multiplied: an unwritten NaN cannot leak.
  const at::Tensor in_groups = (at::arange(x.size(0), ends.options().dtype(at::kLong)) < ends.narrow(0, ends.numel() - 1, 1)).unsqueeze(1);
  const at::Tensor out = at::_grouped_mm(at::where(in_groups, x, at::zeros({}, x.options())), weights.transpose(1, 2), ends);  // [N, F]
  return at::where(in_groups, out, at::zeros({}, out.options()));
}

at::Tensor grouped_mm(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& counts) {
  if (counts.dim() != 1 || counts.numel() != weights.size(0))
    throw Error("grouped_mm: " + std::to_string(counts.numel()) + " counts for " + std::to_string(weights.size(0)) + " weight groups");
  // LibTorch's grouped GEMM wants 16-byte aligned rows (H, F multiples of 8 in bfloat16); on CUDA it is
  // Hopper's, and float32 there would go to a slower path than one cuBLAS multiply per group.
  if (x.is_cuda() && x.scalar_type() == at::kBFloat16 && weights.scalar_type() == at::kBFloat16 && x.size(1) % 8 == 0 &&
      weights.size(1) % 8 == 0)
    return grouped_mm_native(x, weights, counts);
  const at::Tensor on_host = counts.to(at::kCPU, at::kLong).contiguous();
  const std::vector<int64_t> rows(on_host.data_ptr<int64_t>(), on_host.data_ptr<int64_t>() + on_host.numel());
  const at::Tensor out = grouped_mm_reference(x, weights, rows);  // [sum(counts), F]
  return out.size(0) == x.size(0) ? out : at::constant_pad_nd(out, {0, 0, 0, x.size(0) - out.size(0)});  // [N, F]
}

at::Tensor chunked_cross_entropy(const at::Tensor& hidden, const at::Tensor& head, const at::Tensor& targets, int64_t chunk_rows) {
  if (chunk_rows < 1) throw Error("chunked_cross_entropy: chunk_rows must be at least 1");
  return ChunkedCrossEntropyFunction::apply(hidden, head, targets, chunk_rows);
}

}  // namespace pithtrain::kernels
