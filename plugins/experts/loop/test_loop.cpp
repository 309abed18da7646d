// loop against a per-token scalar reference: out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t]), for the
// plain SwiGLU and for GPT-OSS's clamped SwiGLU with biases.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "pithtrain/experts.h"

using namespace pithtrain;

namespace {

void check_against_scalar_reference(const std::string& toml, bool clamped, bool bias, double init_std) {
  at::manual_seed(0);
  PluginContext context;
  context.dims = {.hidden_size = 6, .num_layers = 1, .num_experts = 5, .top_k = 2, .expert_hidden_size = 4, .init_std = init_std};
  context.dtype = at::kDouble;
  Options options = Options::from_string(toml, "test.toml");
  auto experts = pithtrain_plugin()->make_experts(options, context);
  options.check_unknown_keys("experts plugin 'loop'");
  auto parameters = experts->parameters();
  ASSERT_EQ(parameters.size(), bias ? 6u : 3u);
  if (bias) {
    at::NoGradGuard no_grad;  // biases start at zero; make them matter
    for (size_t i = 3; i < 6; ++i) parameters[i].tensor.normal_(0.0, 1.0);
  }
  const int64_t tokens = 11;
  at::Tensor x = at::randn({tokens, 6}, at::kDouble) * (clamped ? 3.0 : 1.0);  // large enough to hit the clamps
  Routing routing;
  routing.expert_ids = at::randint(0, 5, {tokens, 2}, at::kLong);
  routing.expert_ids.select(1, 1).copy_((routing.expert_ids.select(1, 0) + 1 + at::randint(0, 4, {tokens}, at::kLong)) % 5);
  routing.weights = at::rand({tokens, 2}, at::kDouble);
  at::Tensor out = experts->forward(x, routing);
  at::Tensor gate = parameters[0].tensor.detach(), up = parameters[1].tensor.detach(), down = parameters[2].tensor.detach();
  int clamped_values = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<double> expected(6, 0.0);
    for (int64_t j = 0; j < 2; ++j) {
      int64_t e = routing.expert_ids[t][j].item<int64_t>();
      std::vector<double> inner(4);
      for (int64_t i = 0; i < 4; ++i) {
        double g = bias ? parameters[3].tensor[e][i].item<double>() : 0.0;
        double u = bias ? parameters[4].tensor[e][i].item<double>() : 0.0;
        for (int64_t h = 0; h < 6; ++h) {
          g += gate[e][i][h].item<double>() * x[t][h].item<double>();
          u += up[e][i][h].item<double>() * x[t][h].item<double>();
        }
        if (clamped) {
          clamped_values += (g > 7.0) + (std::abs(u) > 7.0);
          g = std::min(g, 7.0), u = std::clamp(u, -7.0, 7.0);
          inner[i] = g / (1.0 + std::exp(-1.702 * g)) * (u + 1.0);
        } else {
          inner[i] = g / (1.0 + std::exp(-g)) * u;  // silu(g) * u
        }
      }
      for (int64_t h = 0; h < 6; ++h) {
        double y = bias ? parameters[5].tensor[e][h].item<double>() : 0.0;
        for (int64_t i = 0; i < 4; ++i) y += down[e][h][i].item<double>() * inner[i];
        expected[h] += routing.weights[t][j].item<double>() * y;
      }
    }
    for (int64_t h = 0; h < 6; ++h) EXPECT_NEAR(out[t][h].item<double>(), expected[h], 1e-12) << "token " << t;
  }
  if (clamped) EXPECT_GT(clamped_values, 5) << "the inputs should exercise the clamps";
}

}  // namespace

TEST(LoopExperts, MatchesAPerTokenReference) { check_against_scalar_reference("", false, false, 0.5); }

TEST(LoopExperts, ClampedSwigluWithBiasesMatchesAPerTokenReference) {
  check_against_scalar_reference("activation = \"clamped_swiglu\"\nbias = true\n", true, true, 1.5);
}

TEST(LoopExperts, RejectsAnUnknownActivation) {
  PluginContext context;
  context.dims = {.hidden_size = 6, .num_layers = 1, .num_experts = 5, .top_k = 2, .expert_hidden_size = 4};
  Options options = Options::from_string("activation = \"gelu\"\n", "test.toml");
  try {
    pithtrain_plugin()->make_experts(options, context);
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("test.toml:1"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("clamped_swiglu"), std::string::npos) << error.what();
  }
}
