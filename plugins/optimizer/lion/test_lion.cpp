// lion against its published update rule, computed element by element.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include "pithtrain/optimizer.h"

using namespace pithtrain;

TEST(Lion, FollowsThePublishedUpdateRule) {
  at::manual_seed(0);
  const double lr = 0.01, beta1 = 0.8, beta2 = 0.95, weight_decay = 0.3;
  at::Tensor weight = at::randn({4, 3}, at::kDouble).requires_grad_(true);
  at::Tensor bias = at::randn({4}, at::kDouble).requires_grad_(true);
  PluginContext context;
  context.parameters = {{"weight", weight, true}, {"bias", bias, false}};
  Options options = Options::from_string("beta1 = 0.8\nbeta2 = 0.95\nweight_decay = 0.3\n", "test.toml");
  auto lion = pithtrain_plugin()->make_optimizer(options, context);

  // Reference state, element by element.
  std::vector<double> p_w(12), p_b(4), m_w(12, 0.0), m_b(4, 0.0);
  for (int i = 0; i < 12; ++i) p_w[i] = weight.view(-1)[i].item<double>();
  for (int i = 0; i < 4; ++i) p_b[i] = bias[i].item<double>();
  auto reference_step = [&](std::vector<double>& p, std::vector<double>& m, const at::Tensor& g, bool decay) {
    for (size_t i = 0; i < p.size(); ++i) {
      double grad = g.view(-1)[i].item<double>();
      double c = beta1 * m[i] + (1 - beta1) * grad;
      double sign = c > 0 ? 1.0 : (c < 0 ? -1.0 : 0.0);
      p[i] = p[i] - lr * (sign + (decay ? weight_decay * p[i] : 0.0));
      m[i] = beta2 * m[i] + (1 - beta2) * grad;
    }
  };
  at::Tensor x = at::randn({8, 3}, at::kDouble), y = at::randn({8, 4}, at::kDouble);
  for (int step = 0; step < 15; ++step) {
    weight.mutable_grad() = at::Tensor();
    bias.mutable_grad() = at::Tensor();
    (at::linear(x, weight, bias) - y).pow(2).mean().backward();
    reference_step(p_w, m_w, weight.grad(), true);
    reference_step(p_b, m_b, bias.grad(), false);
    lion->step(lr);
    for (int i = 0; i < 12; ++i) ASSERT_NEAR(weight.view(-1)[i].item<double>(), p_w[i], 1e-14) << "step " << step;
    for (int i = 0; i < 4; ++i) ASSERT_NEAR(bias[i].item<double>(), p_b[i], 1e-14) << "step " << step;
  }
  auto state = lion->state();
  ASSERT_EQ(state.size(), 2u);
  EXPECT_EQ(state[0].name, "weight.momentum");
  for (int i = 0; i < 12; ++i) EXPECT_NEAR(state[0].tensor.view(-1)[i].item<double>(), m_w[i], 1e-14);
}
