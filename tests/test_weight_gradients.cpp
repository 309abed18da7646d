// pithtrain::linear and WeightGradientQueue: a backward run through the queue leaves the weight
// gradients of deferrable linear layers for later, and running them later gives autograd's gradients.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>

#include "pithtrain/nn.h"

using namespace pithtrain;

namespace {
struct DeferralOn {  // deferral is process-wide: switched off again whatever a test does
  DeferralOn() { WeightGradientQueue::enable_deferral(true); }
  ~DeferralOn() { WeightGradientQueue::enable_deferral(false); }
};
}  // namespace

TEST(WeightGradients, DeferredWeightGradientsEqualAutogradOnceRun) {
  at::manual_seed(0);
  at::Tensor x = at::randn({2, 5, 3}, at::kDouble).requires_grad_(true);  // [B, S, in]
  at::Tensor weight = at::randn({4, 3}, at::kDouble).requires_grad_(true);
  at::Tensor bias = at::randn({4}, at::kDouble).requires_grad_(true);
  at::Tensor second = at::randn({2, 4}, at::kDouble).requires_grad_(true);
  auto loss_of = [&](const at::Tensor& input, const at::Tensor& w, const at::Tensor& b, const at::Tensor& w2, bool plain) {
    at::Tensor hidden = plain ? at::linear(input, w, b) : pithtrain::linear(input, w, b);  // [B, S, 4]
    at::Tensor out = plain ? at::linear(at::tanh(hidden), w2) : pithtrain::linear(at::tanh(hidden), w2);
    return out.pow(2).sum();
  };
  // Reference: plain autograd, twice (two micro-batches accumulate).
  at::Tensor rx = x.detach().clone().requires_grad_(true), rw = weight.detach().clone().requires_grad_(true);
  at::Tensor rb = bias.detach().clone().requires_grad_(true), rw2 = second.detach().clone().requires_grad_(true);
  loss_of(rx, rw, rb, rw2, true).backward();
  loss_of(rx * 0.5, rw, rb, rw2, true).backward();

  DeferralOn deferral;
  WeightGradientQueue queue;
  at::Tensor first_loss = loss_of(x, weight, bias, second, false);
  at::Tensor second_loss = loss_of(x * 0.5, weight, bias, second, false);
  queue.defer([&] { first_loss.backward(); });
  // The input's and the bias's gradients are there at once; the weights' are not.
  ASSERT_TRUE(x.grad().defined());
  EXPECT_TRUE(bias.grad().defined());
  EXPECT_FALSE(weight.grad().defined());
  EXPECT_FALSE(second.grad().defined());
  EXPECT_EQ(queue.pending(), 1u);
  second_loss.backward();  // not deferred: computed at once, the deferred group still waits
  ASSERT_TRUE(weight.grad().defined());
  EXPECT_FALSE(at::allclose(weight.grad(), rw.grad()));
  queue.run_oldest();
  EXPECT_EQ(queue.pending(), 0u);
  EXPECT_TRUE(at::allclose(x.grad(), rx.grad(), 1e-12, 1e-12));
  EXPECT_TRUE(at::allclose(bias.grad(), rb.grad(), 1e-12, 1e-12));
  EXPECT_TRUE(at::allclose(weight.grad(), rw.grad(), 1e-12, 1e-12));
  EXPECT_TRUE(at::allclose(second.grad(), rw2.grad(), 1e-12, 1e-12));
  EXPECT_THROW(queue.run_oldest(), Error);
}

TEST(WeightGradients, WithoutDeferralLinearIsAtLinear) {
  at::manual_seed(1);
  at::Tensor x = at::randn({3, 2}, at::kDouble);
  at::Tensor weight = at::randn({5, 2}, at::kDouble).requires_grad_(true);
  at::Tensor out = pithtrain::linear(x, weight);
  // No custom node: the graph is at::linear's own.
  EXPECT_TRUE(at::equal(out, at::linear(x, weight)));
  EXPECT_EQ(out.grad_fn()->name(), at::linear(x, weight).grad_fn()->name());
  WeightGradientQueue queue;
  queue.defer([&] { out.sum().backward(); });  // nothing deferrable: the weight's gradient comes at once
  EXPECT_TRUE(weight.grad().defined());
  EXPECT_EQ(queue.pending(), 1u);
  queue.run_oldest();  // an empty group
}
