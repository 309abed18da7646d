// The MoE kernels (pithtrain/kernels.h). On the CPU: each reference against a naive loop, the arithmetic
// the CUDA kernels implement (written out here per element) against autograd of the reference, and
// chunked cross-entropy against the full one. On a GPU: each CUDA kernel against its CPU reference,
// outputs and gradients; skipped, with the reason, where there is no GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/core/GradMode.h>

#include "pithtrain/error.h"
#include "pithtrain/kernels.h"

using namespace pithtrain;

namespace {

double max_difference(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble).cpu() - b.to(at::kDouble).cpu()).abs().max().item<double>();
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// Routing logits with exact ties: every row holds repeated values.
at::Tensor tied_logits(int64_t tokens, int64_t experts) {
  return at::randint(0, 4, {tokens, experts}, at::kLong).to(at::kFloat) * 0.5;
}

}  // namespace

TEST(Kernels, SwigluBackwardFormulasEqualAutogradOfTheReference) {
  at::manual_seed(0);
  // Values on both sides of the clamp limit, and exactly on it.
  at::Tensor gate = (at::randn({200}, at::kDouble) * 5).requires_grad_(true);
  at::Tensor up = (at::randn({200}, at::kDouble) * 5).requires_grad_(true);
  {
    c10::NoGradGuard no_grad;
    gate[0].fill_(7.0), up[1].fill_(-7.0), up[2].fill_(7.0);
  }
  at::Tensor grad_out = at::randn({200}, at::kDouble);
  for (bool clamped : {false, true}) {
    const double alpha = 1.702, limit = 7.0;
    gate.mutable_grad() = at::Tensor(), up.mutable_grad() = at::Tensor();
    kernels::swiglu_reference(gate, up, clamped, alpha, limit).backward(grad_out);
    // What moe_kernels.cu computes per element.
    at::Tensor grad_gate = at::empty_like(gate), grad_up = at::empty_like(up), out = at::empty_like(gate);
    for (int64_t i = 0; i < 200; ++i) {
      const double g = gate[i].item<double>(), u = up[i].item<double>(), d = grad_out[i].item<double>();
      if (clamped) {
        const double gc = std::min(g, limit), uc = std::min(std::max(u, -limit), limit);
        const double s = sigmoid(alpha * gc), f = gc * s, df = s + alpha * gc * s * (1 - s);
        out[i] = f * (uc + 1);
        grad_gate[i] = g <= limit ? d * (uc + 1) * df : 0.0;
        grad_up[i] = (u >= -limit && u <= limit) ? d * f : 0.0;
      } else {
        const double s = sigmoid(g);
        out[i] = g * s * u;
        grad_gate[i] = d * u * s * (1 + g * (1 - s));
        grad_up[i] = d * g * s;
      }
    }
    EXPECT_LT(max_difference(out, kernels::swiglu_reference(gate, up, clamped, alpha, limit)), 1e-12) << clamped;
    EXPECT_LT(max_difference(grad_gate, gate.grad()), 1e-12) << clamped;
    EXPECT_LT(max_difference(grad_up, up.grad()), 1e-12) << clamped;
  }
}

TEST(Kernels, PermuteAndCombineEqualNaiveLoopsWithGradients) {
  at::manual_seed(1);
  const int64_t tokens = 9, k = 3, experts = 5, hidden = 4;
  at::Tensor expert_ids = at::stack({at::randperm(experts, at::kLong).narrow(0, 0, k), at::randperm(experts, at::kLong).narrow(0, 0, k),
                                     at::randperm(experts, at::kLong).narrow(0, 0, k), at::randperm(experts, at::kLong).narrow(0, 0, k),
                                     at::randperm(experts, at::kLong).narrow(0, 0, k), at::randperm(experts, at::kLong).narrow(0, 0, k),
                                     at::randperm(experts, at::kLong).narrow(0, 0, k), at::randperm(experts, at::kLong).narrow(0, 0, k),
                                     at::randperm(experts, at::kLong).narrow(0, 0, k)});  // [T, k], distinct per token
  at::Tensor counts;
  at::Tensor slot_of = kernels::slots_by_expert(expert_ids, experts, counts);
  // Naive: walk the experts in order, and within one the (token, choice) pairs in order.
  std::vector<int64_t> expected_slot(tokens * k), expected_counts(experts, 0);
  int64_t next = 0;
  for (int64_t e = 0; e < experts; ++e)
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t j = 0; j < k; ++j)
        if (expert_ids[t][j].item<int64_t>() == e) expected_slot[t * k + j] = next++, ++expected_counts[e];
  for (int64_t i = 0; i < tokens * k; ++i) EXPECT_EQ(slot_of.reshape(-1)[i].item<int64_t>(), expected_slot[i]);
  for (int64_t e = 0; e < experts; ++e) EXPECT_EQ(counts[e].item<int64_t>(), expected_counts[e]);

  at::Tensor x = at::randn({tokens, hidden}, at::kDouble).requires_grad_(true);
  at::Tensor permuted = kernels::permute_rows(x, slot_of);  // [T * k, H]
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t j = 0; j < k; ++j) EXPECT_TRUE(at::equal(permuted[expected_slot[t * k + j]], x[t]));
  at::Tensor y = at::randn({tokens * k, hidden}, at::kDouble).requires_grad_(true);
  at::Tensor weights = at::rand({tokens, k}, at::kDouble).requires_grad_(true);
  at::Tensor combined = kernels::unpermute_combine(y, slot_of, weights);  // [T, H]
  at::Tensor grad_out = at::randn({tokens, hidden}, at::kDouble);
  combined.backward(grad_out);
  permuted.backward(at::ones_like(permuted));
  for (int64_t t = 0; t < tokens; ++t) {
    at::Tensor row = at::zeros({hidden}, at::kDouble);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t slot = expected_slot[t * k + j];
      row += weights[t][j].detach() * y[slot].detach();
      // The combine's backward as the kernel computes it.
      EXPECT_LT(max_difference(y.grad()[slot], weights[t][j].detach() * grad_out[t]), 1e-12);
      EXPECT_NEAR(weights.grad()[t][j].item<double>(), (grad_out[t] * y[slot].detach()).sum().item<double>(), 1e-12);
    }
    EXPECT_LT(max_difference(combined[t], row), 1e-12);
    // permute's backward sums a token's k rows.
    EXPECT_LT(max_difference(x.grad()[t], at::full({hidden}, static_cast<double>(k), at::kDouble)), 1e-12);
  }
}

TEST(Kernels, RouteTopKReferenceEqualsNaiveSelectionWithTies) {
  at::manual_seed(2);
  const int64_t tokens = 20, experts = 6, k = 3;
  at::Tensor logits = tied_logits(tokens, experts);
  at::Tensor bias = at::tensor({0.0f, 0.25f, 0.0f, -0.25f, 0.0f, 0.5f});
  for (bool use_sigmoid : {false, true})
    for (bool renormalize : {false, true}) {
      kernels::TopK result = kernels::route_topk(logits, use_sigmoid ? bias : at::Tensor(), k, use_sigmoid, renormalize, 2.5);
      for (int64_t t = 0; t < tokens; ++t) {
        std::vector<double> score(experts);
        double top = -1e30, total = 0;
        for (int64_t e = 0; e < experts; ++e) top = std::max(top, logits[t][e].item<double>());
        for (int64_t e = 0; e < experts; ++e) total += std::exp(logits[t][e].item<double>() - top);
        for (int64_t e = 0; e < experts; ++e)
          score[e] = use_sigmoid ? sigmoid(logits[t][e].item<double>()) : std::exp(logits[t][e].item<double>() - top) / total;
        std::vector<bool> taken(experts, false);
        std::vector<int64_t> ids;
        double chosen = 0;
        for (int64_t pick = 0; pick < k; ++pick) {
          int64_t best = -1;
          for (int64_t e = 0; e < experts; ++e) {
            const double value = score[e] + (use_sigmoid ? bias[e].item<double>() : 0.0);
            const double best_value = best < 0 ? -1e30 : score[best] + (use_sigmoid ? bias[best].item<double>() : 0.0);
            if (!taken[e] && (best < 0 || value > best_value)) best = e;  // strict: ties keep the lower index
          }
          taken[best] = true, ids.push_back(best), chosen += score[best];
        }
        for (int64_t j = 0; j < k; ++j) {
          EXPECT_EQ(result.expert_ids[t][j].item<int64_t>(), ids[j]) << t << " " << j;
          const double weight = (renormalize ? score[ids[j]] / (chosen + 1e-20) : score[ids[j]]) * 2.5;
          EXPECT_NEAR(result.weights[t][j].item<double>(), weight, 1e-6);
        }
      }
    }
}

TEST(Kernels, GroupedMatmulEqualsOneMatmulPerGroupIncludingEmptyGroups) {
  at::manual_seed(3);
  const std::vector<int64_t> counts = {3, 0, 5, 1};
  at::Tensor x = at::randn({9, 6}, at::kDouble).requires_grad_(true);
  at::Tensor weights = at::randn({4, 7, 6}, at::kDouble).requires_grad_(true);
  at::Tensor out = kernels::grouped_mm(x, weights, at::tensor(counts));
  ASSERT_EQ(out.sizes(), (std::vector<int64_t>{9, 7}));
  int64_t row = 0;
  for (int64_t group = 0; group < 4; ++group)
    for (int64_t i = 0; i < counts[group]; ++i, ++row) EXPECT_LT(max_difference(out[row], at::mv(weights[group], x[row])), 1e-12);
  out.sum().backward();
  EXPECT_EQ(weights.grad()[1].abs().max().item<double>(), 0.0);  // the empty group gets no gradient
  EXPECT_THROW(kernels::grouped_mm(x, weights, at::tensor(std::vector<int64_t>{9})), Error);
}

// The call grouped_mm makes on CUDA (LibTorch's grouped GEMM over device-side group ends), run by
// LibTorch's CPU implementation: outputs and both gradients against one matrix multiply per group.
TEST(Kernels, NativeGroupedMatmulCallEqualsTheReferenceOnTheCpu) {
  at::manual_seed(5);
  const std::vector<int64_t> counts = {5, 0, 9, 2, 0, 16};  // empty groups inside and at the end
  const at::Tensor x = at::randn({32, 16}), weights = at::randn({6, 24, 16}) * 0.2, grad = at::randn({32, 24});
  const at::Tensor x1 = x.clone().requires_grad_(true), w1 = weights.clone().requires_grad_(true);
  const at::Tensor x2 = x.clone().requires_grad_(true), w2 = weights.clone().requires_grad_(true);
  at::Tensor native = kernels::grouped_mm_native(x1, w1, at::tensor(counts));
  at::Tensor reference = kernels::grouped_mm_reference(x2, w2, counts);
  ASSERT_EQ(native.sizes(), reference.sizes());
  EXPECT_LT(max_difference(native, reference), 1e-5);
  native.backward(grad), reference.backward(grad);
  EXPECT_LT(max_difference(x1.grad(), x2.grad()), 1e-5);
  EXPECT_LT(max_difference(w1.grad(), w2.grad()), 1e-5);
  EXPECT_EQ(w1.grad()[1].abs().max().item<double>(), 0.0);  // an empty group gets no gradient
}

TEST(Kernels, ChunkedCrossEntropyEqualsTheFullOneForEveryChunkSize) {
  at::manual_seed(4);
  const int64_t rows = 7, hidden = 5, vocab = 11;
  at::Tensor hidden_states = at::randn({rows, hidden}, at::kDouble).requires_grad_(true);
  at::Tensor head = at::randn({vocab, hidden}, at::kDouble).requires_grad_(true);
  at::Tensor targets = at::randint(0, vocab, {rows}, at::kLong);
  at::Tensor reference = at::cross_entropy_loss(at::linear(hidden_states, head), targets);
  reference.backward();
  const at::Tensor grad_hidden = hidden_states.grad().clone(), grad_head = head.grad().clone();
  for (int64_t chunk : {1, 3, 7, 100}) {
    hidden_states.mutable_grad() = at::Tensor(), head.mutable_grad() = at::Tensor();
    at::Tensor loss = kernels::chunked_cross_entropy(hidden_states, head, targets, chunk);
    loss.backward();
    EXPECT_NEAR(loss.item<double>(), reference.item<double>(), 1e-12) << chunk;
    EXPECT_LT(max_difference(hidden_states.grad(), grad_hidden), 1e-12) << chunk;
    EXPECT_LT(max_difference(head.grad(), grad_head), 1e-12) << chunk;
  }
  EXPECT_THROW(kernels::chunked_cross_entropy(hidden_states, head, targets, 0), Error);
}

// The fused CPU kernels (rms_norm, rope on float32/float64) against their references: outputs and
// every gradient, 1e-12 in float64 and float32 rounding in float32.
TEST(Kernels, FusedCpuKernelsEqualTheirReferences) {
  at::manual_seed(10);
  for (auto dtype : {at::kDouble, at::kFloat}) {
    const double tolerance = dtype == at::kDouble ? 1e-12 : 2e-5;
    auto compare = [&](const std::string& what, const std::function<at::Tensor(const std::vector<at::Tensor>&)>& fused,
                       const std::function<at::Tensor(const std::vector<at::Tensor>&)>& reference, std::vector<at::Tensor> inputs) {
      std::vector<at::Tensor> a, b;
      for (auto& input : inputs) a.push_back(input.clone().requires_grad_(true)), b.push_back(input.clone().requires_grad_(true));
      at::Tensor out_a = fused(a), out_b = reference(b);
      const at::Tensor grad_out = at::randn_like(out_a);
      out_a.backward(grad_out), out_b.backward(grad_out);
      EXPECT_LT(max_difference(out_a, out_b), tolerance) << what << " " << dtype;
      for (size_t i = 0; i < a.size(); ++i)
        EXPECT_LT(max_difference(a[i].grad(), b[i].grad()), tolerance * 10) << what << " input " << i << " " << dtype;
    };
    const auto options = at::TensorOptions().dtype(dtype);
    compare("rms_norm", [](auto& t) { return kernels::rms_norm(t[0], t[1], 1e-5); },
            [](auto& t) { return kernels::rms_norm_reference(t[0], t[1], 1e-5); },
            {at::randn({3, 7, 16}, options), at::rand({16}, options) + 0.5});
    const at::Tensor angles = at::randn({6, 4}, options);  // [S, D / 2]
    const at::Tensor cos = at::cat({angles.cos(), angles.cos()}, -1), sin = at::cat({angles.sin(), angles.sin()}, -1);
    compare("rope", [&](auto& t) { return kernels::rope(t[0], cos, sin); }, [&](auto& t) { return kernels::rope_reference(t[0], cos, sin); },
            {at::randn({2, 6, 3, 8}, options)});
    // A transposed (non-contiguous) input takes the same path.
    compare("rope, strided input", [&](auto& t) { return kernels::rope(t[0].transpose(1, 2).transpose(1, 2), cos, sin); },
            [&](auto& t) { return kernels::rope_reference(t[0], cos, sin); }, {at::randn({2, 6, 3, 8}, options)});
  }
}

// ---- on a GPU: each kernel against its CPU reference -------------------------------------------------
namespace {
bool skip_without_gpu(std::string& why) {
  if (!kernels::cuda_kernels_built()) return why = "this build has no CUDA kernels (nvcc was not found)", true;
  if (!at::hasCUDA()) return why = "no CUDA device on this machine", true;
  return false;
}
}  // namespace

TEST(KernelsOnGpu, SwigluEqualsTheCpuReference) {
  std::string why;
  if (skip_without_gpu(why)) GTEST_SKIP() << why;
  at::manual_seed(5);
  for (auto dtype : {at::kFloat, at::kBFloat16})
    for (bool clamped : {false, true}) {
      at::Tensor gate = (at::randn({1000, 33}) * 4).to(dtype), up = (at::randn({1000, 33}) * 4).to(dtype);
      at::Tensor gate_gpu = gate.cuda().requires_grad_(true), up_gpu = up.cuda().requires_grad_(true);
      at::Tensor gate_cpu = gate.to(at::kFloat).requires_grad_(true), up_cpu = up.to(at::kFloat).requires_grad_(true);
      at::Tensor grad_out = at::randn({1000, 33});
      at::Tensor out_gpu = kernels::swiglu(gate_gpu, up_gpu, clamped);
      at::Tensor out_cpu = kernels::swiglu_reference(gate_cpu, up_cpu, clamped);
      out_gpu.backward(grad_out.to(dtype).cuda());
      out_cpu.backward(grad_out.to(dtype).to(at::kFloat));
      const double tolerance = dtype == at::kFloat ? 1e-5 : 5e-2;  // bfloat16 rounds its outputs to 8 bits
      EXPECT_LT(max_difference(out_gpu, out_cpu), tolerance * (1 + out_cpu.abs().max().item<double>()));
      EXPECT_LT(max_difference(gate_gpu.grad(), gate_cpu.grad()), tolerance * (1 + gate_cpu.grad().abs().max().item<double>()));
      EXPECT_LT(max_difference(up_gpu.grad(), up_cpu.grad()), tolerance * (1 + up_cpu.grad().abs().max().item<double>()));
    }
}

TEST(KernelsOnGpu, PermuteAndCombineEqualTheCpuReference) {
  std::string why;
  if (skip_without_gpu(why)) GTEST_SKIP() << why;
  at::manual_seed(6);
  const int64_t tokens = 300, k = 4, experts = 16, hidden = 96;
  at::Tensor expert_ids = std::get<1>(at::topk(at::rand({tokens, experts}), k, -1));
  at::Tensor counts;
  at::Tensor slot_of = kernels::slots_by_expert(expert_ids, experts, counts);
  at::Tensor x = at::randn({tokens, hidden}), y = at::randn({tokens * k, hidden}), weights = at::rand({tokens, k});
  at::Tensor grad_permuted = at::randn({tokens * k, hidden}), grad_combined = at::randn({tokens, hidden});
  auto run = [&](const at::Device& device) {
    at::Tensor xs = x.to(device).requires_grad_(true), ys = y.to(device).requires_grad_(true), ws = weights.to(device).requires_grad_(true);
    at::Tensor permuted = kernels::permute_rows(xs, slot_of.to(device));
    at::Tensor combined = kernels::unpermute_combine(ys, slot_of.to(device), ws);
    permuted.backward(grad_permuted.to(device));
    combined.backward(grad_combined.to(device));
    return std::vector<at::Tensor>{permuted, combined, xs.grad(), ys.grad(), ws.grad()};
  };
  const auto gpu = run(at::Device(at::kCUDA, 0)), cpu = run(at::Device(at::kCPU));
  for (size_t i = 0; i < gpu.size(); ++i) EXPECT_LT(max_difference(gpu[i], cpu[i]), 1e-4) << i;
}

TEST(KernelsOnGpu, RouteTopKEqualsTheCpuReference) {
  std::string why;
  if (skip_without_gpu(why)) GTEST_SKIP() << why;
  at::manual_seed(7);
  at::Tensor logits = tied_logits(500, 64);
  at::Tensor bias = at::randn({64}) * 0.1;
  for (bool use_sigmoid : {false, true}) {
    kernels::TopK gpu = kernels::route_topk(logits.cuda(), bias.cuda(), 8, use_sigmoid, true, 1.0);
    kernels::TopK cpu = kernels::route_topk_reference(logits, bias, 8, use_sigmoid, true, 1.0);
    EXPECT_TRUE(at::equal(gpu.expert_ids.cpu(), cpu.expert_ids));
    EXPECT_LT(max_difference(gpu.weights, cpu.weights), 1e-5);
    EXPECT_LT(max_difference(gpu.scores, cpu.scores), 1e-5);
  }
}

TEST(KernelsOnGpu, CountPerExpertEqualsBincount) {
  std::string why;
  if (skip_without_gpu(why)) GTEST_SKIP() << why;
  at::manual_seed(10);
  const at::Tensor ids = at::randint(0, 100, {4096, 8}, at::kLong).clamp_max(59);  // experts 60..127 get none, 59 many
  const at::Tensor gpu = kernels::count_per_expert(ids.cuda(), 128);
  EXPECT_EQ(gpu.scalar_type(), at::kLong);
  EXPECT_TRUE(at::equal(gpu.cpu(), at::bincount(ids.reshape(-1), {}, 128)));
}

TEST(KernelsOnGpu, GroupedMatmulEqualsTheCpuReference) {
  std::string why;
  if (skip_without_gpu(why)) GTEST_SKIP() << why;
  at::manual_seed(8);
  const std::vector<int64_t> counts = {40, 0, 17, 71};
  at::Tensor x = at::randn({128, 64}), weights = at::randn({4, 32, 64}) * 0.1, grad = at::randn({128, 32});
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    // Both sides start from the same (rounded) values; the CPU side computes in float32.
    at::Tensor x_gpu = x.to(dtype).cuda().requires_grad_(true), w_gpu = weights.to(dtype).cuda().requires_grad_(true);
    at::Tensor x_cpu = x.to(dtype).to(at::kFloat).requires_grad_(true), w_cpu = weights.to(dtype).to(at::kFloat).requires_grad_(true);
    at::Tensor gpu = kernels::grouped_mm(x_gpu, w_gpu, at::tensor(counts).cuda());
    at::Tensor cpu = kernels::grouped_mm_reference(x_cpu, w_cpu, counts);
    const double tolerance = dtype == at::kFloat ? 1e-3 : 5e-2;
    EXPECT_LT(max_difference(gpu, cpu), tolerance) << dtype;
    gpu.backward(grad.to(dtype).cuda()), cpu.backward(grad.to(dtype).to(at::kFloat));
    EXPECT_LT(max_difference(x_gpu.grad(), x_cpu.grad()), tolerance) << dtype;
    EXPECT_LT(max_difference(w_gpu.grad(), w_cpu.grad()), 4 * tolerance) << dtype;  // sums over up to 71 rows
  }
}

TEST(KernelsOnGpu, ChunkedCrossEntropyEqualsTheCpuOne) {
  std::string why;
  if (skip_without_gpu(why)) GTEST_SKIP() << why;
  at::manual_seed(9);
  at::Tensor hidden = at::randn({64, 32}), head = at::randn({1000, 32}) * 0.1, targets = at::randint(0, 1000, {64}, at::kLong);
  at::Tensor gpu = kernels::chunked_cross_entropy(hidden.cuda(), head.cuda(), targets.cuda(), 16);
  at::Tensor cpu = at::cross_entropy_loss(at::linear(hidden, head), targets);
  EXPECT_NEAR(gpu.item<double>(), cpu.item<double>(), 1e-4);
}
