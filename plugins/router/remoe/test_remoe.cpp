// remoe against the paper's formulas written out element by element: the ReLU gates, the L1 penalty
// (plain and load-balanced) and the adaptive coefficient shared by all layers.
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

// R(x)[t][e] = max(0, sum_h x[t][h] W[e][h]), one number at a time.
std::vector<std::vector<double>> relu_gates(const at::Tensor& x, const at::Tensor& gate) {
  std::vector<std::vector<double>> gates(x.size(0), std::vector<double>(gate.size(0)));
  for (int64_t t = 0; t < x.size(0); ++t)
    for (int64_t e = 0; e < gate.size(0); ++e) {
      double logit = 0;
      for (int64_t h = 0; h < x.size(1); ++h) logit += x[t][h].item<double>() * gate[e][h].item<double>();
      gates[t][e] = std::max(0.0, logit);
    }
  return gates;
}

double coefficient_of(Router& router) { return router.buffers().at(0).tensor.item<double>(); }

}  // namespace

TEST(ReMoE, RoutesEveryExpertWithAPositiveGateWithItsGateAsWeight) {
  at::manual_seed(0);
  const int64_t tokens = 12, hidden = 6, experts = 8, k = 2;
  PluginContext context = context_for(hidden, experts, k);
  auto router = make("", context);
  at::Tensor x = at::randn({tokens, hidden}, at::kDouble);
  Routing routing = router->route(x);
  const auto gates = relu_gates(x, router->parameters()[0].tensor.detach());
  std::vector<int64_t> expected_load(experts, 0);
  int64_t busiest = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    int64_t active = 0;
    std::vector<double> routed(experts, 0.0);
    for (int64_t j = 0; j < routing.expert_ids.size(1); ++j)
      routed[routing.expert_ids[t][j].item<int64_t>()] += routing.weights[t][j].item<double>();
    for (int64_t e = 0; e < experts; ++e) {
      EXPECT_NEAR(routed[e], gates[t][e], 1e-12) << "token " << t << " expert " << e;
      if (gates[t][e] > 0) ++active, ++expected_load[e];
    }
    busiest = std::max(busiest, active);
  }
  EXPECT_EQ(routing.expert_ids.size(1), std::max<int64_t>(busiest, 1)) << "slots = the busiest token's active experts";
  for (int64_t e = 0; e < experts; ++e) EXPECT_EQ(routing.tokens_per_expert[e].item<int64_t>(), expected_load[e]);
  EXPECT_TRUE(router->variable_experts_per_token());
}

TEST(ReMoE, L1PenaltyIsThePapersPlainAndLoadBalancedForm) {
  at::manual_seed(1);
  const int64_t tokens = 10, hidden = 5, experts = 6, k = 2;
  for (const bool balanced : {false, true}) {
    PluginContext context = context_for(hidden, experts, k);
    auto router = make(std::string("l1_coeff_init = 0.37\nload_balance = ") + (balanced ? "true" : "false") + "\n", context);
    at::Tensor x = at::randn({tokens, hidden}, at::kDouble);
    Routing routing = router->route(x);
    const auto gates = relu_gates(x, router->parameters()[0].tensor.detach());
    // L_reg = 1/T sum_t sum_e f_e R_te; f_e = 1, or E/(k T) * #{t : R_te > 0} (one layer: the 1/L is 1).
    double expected = 0;
    for (int64_t e = 0; e < experts; ++e) {
      double f = 1.0;
      if (balanced) {
        int64_t active = 0;
        for (int64_t t = 0; t < tokens; ++t) active += gates[t][e] > 0;
        f = static_cast<double>(experts) / static_cast<double>(k * tokens) * static_cast<double>(active);
      }
      for (int64_t t = 0; t < tokens; ++t) expected += f * gates[t][e] / static_cast<double>(tokens);
    }
    ASSERT_EQ(routing.loss_terms.size(), 1u);
    EXPECT_EQ(routing.loss_terms[0].name, "l1");
    EXPECT_NEAR(routing.loss_terms[0].tensor.item<double>(), 0.37 * expected, 1e-12) << "load_balance " << balanced;
    EXPECT_NEAR(routing.aux_loss.item<double>(), 0.37 * expected, 1e-12);
  }
}

TEST(ReMoE, OneCoefficientForAllLayersFollowsTheirJointSparsity) {
  // Two layers of one model share lambda (PluginContext::shared). Each step: lambda *= alpha when the
  // sparsity of all layers together is below the target, /= alpha when above.
  at::manual_seed(2);
  const int64_t tokens = 16, hidden = 4, experts = 4, k = 1;  // target sparsity 1 - 1/4 = 0.75
  PluginContext context = context_for(hidden, experts, k);
  auto first = make("l1_coeff_init = 0.01\nl1_coeff_multiplier = 1.5\n", context);
  auto second = make("l1_coeff_init = 0.01\nl1_coeff_multiplier = 1.5\n", context);
  at::Tensor x = at::randn({tokens, hidden}, at::kDouble);
  double expected = 0.01;
  for (int step = 0; step < 4; ++step) {
    // Dense steps (all gates positive: weights >= 0 and x >= 0) and sparse ones (all gates 0).
    const bool dense = step % 2 == 0;
    {
      at::NoGradGuard no_grad;
      first->parameters()[0].tensor.copy_(dense ? at::rand({experts, hidden}, at::kDouble) + 0.1 : -at::rand({experts, hidden}, at::kDouble) - 0.1);
      second->parameters()[0].tensor.copy_(at::rand({experts, hidden}, at::kDouble) + 0.1);
    }
    // First layer dense/sparse, second always dense: sparsity 0 (dense step) or 0.5 (sparse step), both
    // below 0.75, so lambda grows on every step; checked against the count by hand.
    const at::Tensor positive = x.abs();
    int64_t active = 0;
    for (auto* router : {first.get(), second.get()}) {
      Routing routing = router->route(positive);
      active += (routing.weights > 0).sum().item<int64_t>();
    }
    const double sparsity = 1.0 - static_cast<double>(active) / static_cast<double>(2 * tokens * experts);
    EXPECT_DOUBLE_EQ(sparsity, dense ? 0.0 : 0.5);
    first->after_optimizer_step();
    EXPECT_DOUBLE_EQ(coefficient_of(*first), expected) << "lambda moves once all layers have stepped";
    second->after_optimizer_step();
    expected *= 1.5;
    EXPECT_NEAR(coefficient_of(*first), expected, 1e-15);
    EXPECT_NEAR(coefficient_of(*second), expected, 1e-15) << "one lambda for both layers";
  }
  // Now both layers all-zero: sparsity 1 > 0.75, lambda divided by alpha.
  {
    at::NoGradGuard no_grad;
    for (auto* router : {first.get(), second.get()}) router->parameters()[0].tensor.copy_(-at::rand({experts, hidden}, at::kDouble) - 0.1);
  }
  for (auto* router : {first.get(), second.get()}) {
    Routing routing = router->route(x.abs());
    EXPECT_EQ(routing.tokens_per_expert.sum().item<int64_t>(), 0);
    EXPECT_EQ(routing.expert_ids.size(1), 1) << "no token uses an expert: one unused slot";
  }
  first->after_optimizer_step();
  second->after_optimizer_step();
  EXPECT_NEAR(coefficient_of(*first), expected / 1.5, 1e-15);
  // Evaluation (no gradients) does not count toward the controller.
  {
    at::NoGradGuard no_grad;
    for (auto* router : {first.get(), second.get()}) router->route(x.abs());
  }
  first->after_optimizer_step();
  second->after_optimizer_step();
  EXPECT_NEAR(coefficient_of(*first), expected / 1.5, 1e-15) << "a step with nothing counted leaves lambda";
}

TEST(ReMoE, TheStatisticIsTheCoefficientAndTheTargetDefaultsTo1MinusKOverE) {
  PluginContext context = context_for(4, 8, 2);
  auto router = make("l1_coeff_init = 0.5\n", context);
  Routing routing;
  {
    at::NoGradGuard no_grad;  // not counted toward the step's sparsity below
    routing = router->route(at::randn({3, 4}, at::kDouble));
  }
  ASSERT_EQ(routing.statistics.size(), 1u);
  EXPECT_EQ(routing.statistics[0].name, "l1_coefficient");
  EXPECT_DOUBLE_EQ(routing.statistics[0].tensor.item<double>(), 0.5);
  // Target 1 - 2/8 = 0.75: a step at sparsity exactly 0.75 leaves lambda unchanged.
  {
    at::NoGradGuard no_grad;
    router->parameters()[0].tensor.zero_();
    router->parameters()[0].tensor.narrow(0, 0, 2).fill_(1.0);  // experts 0 and 1 positive for positive x
  }
  router->route(at::rand({5, 4}, at::kDouble) + 0.1);
  router->after_optimizer_step();
  EXPECT_DOUBLE_EQ(coefficient_of(*router), 0.5);
}

TEST(ReMoE, BadOptionsAndPipelineStagesAreRefusedByName) {
  PluginContext context = context_for(4, 8, 2);
  EXPECT_THROW(make("l1_coeff_multiplier = 1.0\n", context), Error);
  EXPECT_THROW(make("target_sparsity = 1.0\n", context), Error);
  EXPECT_THROW(make("l1_coeff_init = 0\n", context), Error);
  try {
    make("l1_coeff_multiplier = 0.5\n", context);
    FAIL() << "accepted a multiplier below 1";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("l1_coeff_multiplier"), std::string::npos) << error.what();
  }
}
