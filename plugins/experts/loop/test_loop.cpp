// loop against a per-token reference: out[t] = sum_j w[t, j] * SwiGLU_{ids[t, j]}(x[t]).
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include "pithtrain/experts.h"

using namespace pithtrain;

TEST(LoopExperts, MatchesAPerTokenReference) {
  at::manual_seed(0);
  PluginContext context;
  context.dims = {.hidden_size = 6, .num_layers = 1, .num_experts = 5, .top_k = 2, .expert_hidden_size = 4, .init_std = 0.5};
  context.dtype = at::kDouble;
  Options options = Options::from_string("", "test.toml");
  auto experts = pithtrain_plugin()->make_experts(options, context);
  const int64_t tokens = 11;
  at::Tensor x = at::randn({tokens, 6}, at::kDouble);
  Routing routing;
  routing.expert_ids = at::randint(0, 5, {tokens, 2}, at::kLong);
  routing.expert_ids.select(1, 1).copy_((routing.expert_ids.select(1, 0) + 1 + at::randint(0, 4, {tokens}, at::kLong)) % 5);
  routing.weights = at::rand({tokens, 2}, at::kDouble);
  at::Tensor out = experts->forward(x, routing);
  auto parameters = experts->parameters();
  at::Tensor gate = parameters[0].tensor.detach(), up = parameters[1].tensor.detach(), down = parameters[2].tensor.detach();
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<double> expected(6, 0.0);
    for (int64_t j = 0; j < 2; ++j) {
      int64_t e = routing.expert_ids[t][j].item<int64_t>();
      std::vector<double> inner(4);
      for (int64_t i = 0; i < 4; ++i) {
        double g = 0, u = 0;
        for (int64_t h = 0; h < 6; ++h) {
          g += gate[e][i][h].item<double>() * x[t][h].item<double>();
          u += up[e][i][h].item<double>() * x[t][h].item<double>();
        }
        inner[i] = g / (1.0 + std::exp(-g)) * u;  // silu(g) * u
      }
      for (int64_t h = 0; h < 6; ++h) {
        double y = 0;
        for (int64_t i = 0; i < 4; ++i) y += down[e][h][i].item<double>() * inner[i];
        expected[h] += routing.weights[t][j].item<double>() * y;
      }
    }
    for (int64_t h = 0; h < 6; ++h) EXPECT_NEAR(out[t][h].item<double>(), expected[h], 1e-12) << "token " << t;
  }
}
