// top_any against DynMoE's gating written out element by element: cosine scores, sigmoid thresholds,
// the top-1 fallback, the mean of the active experts and the straight-through gradient.
#include <gtest/gtest.h>

#include <cmath>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "pithtrain/router.h"

using namespace pithtrain;

namespace {

PluginContext context_for(int64_t hidden, int64_t experts, int64_t k) {
  PluginContext context;
  context.dims.hidden_size = hidden;
  context.dims.num_experts = experts;
  context.dims.top_k = k;
  context.dims.init_std = 0.5;
  context.dtype = at::kDouble;
  return context;
}

std::unique_ptr<Router> make(const std::string& toml, const PluginContext& context) {
  Options options = Options::from_string(toml, "test.toml");
  return pithtrain_plugin()->make_router(options, context);
}

double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

}  // namespace

TEST(TopAny, UsesEveryExpertAboveItsThresholdAtLeastOneWithEqualWeights) {
  at::manual_seed(0);
  const int64_t tokens = 16, hidden = 6, experts = 8;
  auto router = make("aux_loss_coeff = 0\n", context_for(hidden, experts, 2));
  at::Tensor gate = router->parameters()[0].tensor, thresholds = router->parameters()[1].tensor;
  ASSERT_EQ(router->parameters()[1].name, "gate.threshold");
  {
    at::NoGradGuard no_grad;
    thresholds.copy_(at::rand({experts}, at::kDouble) * 0.8);  // some tokens pass none: the fallback runs
  }
  at::Tensor x = at::randn({tokens, hidden}, at::kDouble);
  Routing routing = router->route(x);
  at::Tensor probe = at::randn(routing.weights.sizes(), at::kDouble);
  (routing.weights * probe).sum().backward();
  std::vector<double> expected_threshold_grad(experts, 0.0);
  int fallbacks = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    // s_e = <x, W_e> / (|x| |W_e|); active: sigmoid(s_e) > sigmoid(G_e); none active: the best s_e alone.
    std::vector<double> score(experts);
    double x_norm = 0;
    for (int64_t h = 0; h < hidden; ++h) x_norm += x[t][h].item<double>() * x[t][h].item<double>();
    for (int64_t e = 0; e < experts; ++e) {
      double dot = 0, w_norm = 0;
      for (int64_t h = 0; h < hidden; ++h) {
        dot += x[t][h].item<double>() * gate[e][h].item<double>();
        w_norm += gate[e][h].item<double>() * gate[e][h].item<double>();
      }
      score[e] = dot / std::sqrt(x_norm * w_norm);
    }
    std::vector<bool> active(experts);
    int64_t count = 0;
    for (int64_t e = 0; e < experts; ++e) count += active[e] = sigmoid(score[e]) > sigmoid(thresholds[e].item<double>());
    if (count == 0) {
      active[std::max_element(score.begin(), score.end()) - score.begin()] = true, count = 1, ++fallbacks;
    }
    std::vector<double> routed(experts, 0.0), probe_of(experts, 0.0);
    for (int64_t j = 0; j < routing.expert_ids.size(1); ++j) {
      const int64_t e = routing.expert_ids[t][j].item<int64_t>();
      const double weight = routing.weights[t][j].item<double>();
      if (weight != 0) routed[e] += weight, probe_of[e] += probe[t][j].item<double>();
    }
    for (int64_t e = 0; e < experts; ++e) {
      EXPECT_DOUBLE_EQ(routed[e], active[e] ? 1.0 / static_cast<double>(count) : 0.0) << "token " << t << " expert " << e;
      // Straight through: d weight / d G_e = -sigmoid'(G_e) on every used pair.
      const double g = sigmoid(thresholds[e].item<double>());
      if (active[e]) expected_threshold_grad[e] -= probe_of[e] * g * (1 - g);
    }
  }
  EXPECT_GT(fallbacks, 0) << "the inputs should exercise the at-least-one rule";
  for (int64_t e = 0; e < experts; ++e) EXPECT_NEAR(thresholds.grad()[e].item<double>(), expected_threshold_grad[e], 1e-12) << e;
  EXPECT_TRUE(router->variable_experts_per_token());
}

TEST(TopAny, TheBalanceLossCountsOnlyUsedPairs) {
  at::manual_seed(1);
  const int64_t tokens = 12, hidden = 5, experts = 4;
  auto router = make("aux_loss_coeff = 0.5\nthreshold_init = 0.2\n", context_for(hidden, experts, 1));
  at::Tensor x = at::randn({tokens, hidden}, at::kDouble);
  Routing routing = router->route(x);
  // E * sum_e f_e P_e, f_e = used pairs on e / used pairs, P_e = mean_t sigmoid(s_te) / sum_j sigmoid(s_tj).
  at::Tensor w = router->parameters()[0].tensor.detach();
  at::Tensor scores = at::matmul(x / x.norm(2, -1, true), (w / w.norm(2, -1, true)).t());
  at::Tensor p = at::sigmoid(scores) / at::sigmoid(scores).sum(-1, true);
  const at::Tensor load = routing.tokens_per_expert.to(at::kDouble);
  const double expected = experts * ((load / load.sum()) * p.mean(0)).sum().item<double>();
  ASSERT_EQ(routing.loss_terms.size(), 1u);
  EXPECT_NEAR(routing.loss_terms[0].tensor.item<double>(), 0.5 * expected, 1e-12);
  EXPECT_EQ(load.sum().item<double>(), (routing.weights != 0).sum().item<double>());
}

TEST(TopAny, BadOptionsAreRefusedByName) {
  try {
    make("threshold_init = 2\n", context_for(4, 4, 1));
    FAIL() << "accepted a threshold outside [-1, 1]";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("threshold_init"), std::string::npos) << error.what();
  }
}
