// adamw equals LibTorch's torch::optim::AdamW, with decay and no-decay parameter groups.
#include <gtest/gtest.h>

#include <torch/optim/adamw.h>

#include "pithtrain/optimizer.h"

using namespace pithtrain;

TEST(AdamW, EqualsLibTorchAdamW) {
  at::manual_seed(0);
  const double lr = 0.01, weight_decay = 0.2;
  at::Tensor w_ours = at::randn({5, 4}, at::kDouble).requires_grad_(true);
  at::Tensor b_ours = at::randn({5}, at::kDouble).requires_grad_(true);
  at::Tensor w_ref = w_ours.detach().clone().requires_grad_(true);
  at::Tensor b_ref = b_ours.detach().clone().requires_grad_(true);

  PluginContext context;
  context.parameters = {{"w", w_ours, true}, {"b", b_ours, false}};
  Options options = Options::from_string("beta1 = 0.8\nbeta2 = 0.9\neps = 1e-6\nweight_decay = 0.2\n", "test.toml");
  auto ours = pithtrain_plugin()->make_optimizer(options, context);

  auto decay = std::make_unique<torch::optim::AdamWOptions>(lr);
  decay->betas({0.8, 0.9}).eps(1e-6).weight_decay(weight_decay);
  auto no_decay = std::make_unique<torch::optim::AdamWOptions>(lr);
  no_decay->betas({0.8, 0.9}).eps(1e-6).weight_decay(0.0);
  torch::optim::AdamW reference({torch::optim::OptimizerParamGroup({w_ref}, std::move(decay)),
                                 torch::optim::OptimizerParamGroup({b_ref}, std::move(no_decay))},
                                torch::optim::AdamWOptions(lr));

  at::Tensor x = at::randn({16, 4}, at::kDouble), y = at::randn({16, 5}, at::kDouble);
  for (int step = 0; step < 20; ++step) {
    for (auto* pair : {&w_ours, &b_ours, &w_ref, &b_ref}) pair->mutable_grad() = at::Tensor();
    (at::linear(x, w_ours, b_ours) - y).pow(3).mean().backward();
    (at::linear(x, w_ref, b_ref) - y).pow(3).mean().backward();
    ours->step(lr);
    reference.step();
    ASSERT_TRUE(at::allclose(w_ours, w_ref, 1e-12, 1e-12)) << "step " << step << ": " << (w_ours - w_ref).abs().max();
    ASSERT_TRUE(at::allclose(b_ours, b_ref, 1e-12, 1e-12)) << "step " << step;
  }
  auto state = ours->state();
  EXPECT_EQ(state.size(), 6u);
  EXPECT_EQ(state[2].name, "w.step");
  EXPECT_EQ(state[2].tensor.item<int64_t>(), 20);
}

TEST(AdamW, RejectsBadBetas) {
  PluginContext context;
  Options options = Options::from_string("beta1 = 1.5\n", "test.toml");
  EXPECT_THROW(pithtrain_plugin()->make_optimizer(options, context), Error);
}
