// aux_free against a plain reference, its bias update rule, and balancing a skewed input.
#include <gtest/gtest.h>

#include <numeric>

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

double imbalance(const at::Tensor& tokens_per_expert) {
  at::Tensor load = tokens_per_expert.to(at::kDouble);
  return (load.max() / load.mean()).item<double>();
}

}  // namespace

TEST(AuxFree, MatchesAPlainReferenceWithABias) {
  at::manual_seed(0);
  const int64_t tokens = 9, hidden = 5, experts = 6, k = 2;
  auto router = make("routed_scaling_factor = 2.5\n", context_for(hidden, experts, k));
  at::Tensor bias = router->buffers().at(0).tensor;
  ASSERT_EQ(router->buffers().at(0).name, "expert_bias");
  bias.copy_(at::randn({experts}, at::kDouble) * 0.3);  // a bias large enough to change choices
  at::Tensor x = at::randn({tokens, hidden}, at::kDouble);
  Routing routing = router->route(x);
  at::Tensor gate = router->parameters()[0].tensor.detach().contiguous();
  int changed_by_bias = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<double> scores(experts), biased(experts);
    for (int64_t e = 0; e < experts; ++e) {
      double logit = 0;
      for (int64_t h = 0; h < hidden; ++h) logit += x[t][h].item<double>() * gate[e][h].item<double>();
      scores[e] = 1.0 / (1.0 + std::exp(-logit));
      biased[e] = scores[e] + bias[e].item<double>();
    }
    std::vector<int64_t> order(experts), unbiased_order(experts);
    std::iota(order.begin(), order.end(), 0);
    std::iota(unbiased_order.begin(), unbiased_order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return biased[a] > biased[b]; });
    std::sort(unbiased_order.begin(), unbiased_order.end(), [&](int64_t a, int64_t b) { return scores[a] > scores[b]; });
    changed_by_bias += order[0] != unbiased_order[0] || order[1] != unbiased_order[1];
    double total = scores[order[0]] + scores[order[1]];
    for (int64_t j = 0; j < k; ++j) {
      EXPECT_EQ(routing.expert_ids[t][j].item<int64_t>(), order[j]);
      // The weights come from the unbiased scores, normalised over the chosen k.
      EXPECT_NEAR(routing.weights[t][j].item<double>(), 2.5 * scores[order[j]] / total, 1e-12);
    }
  }
  EXPECT_GT(changed_by_bias, 0) << "the bias never changed a choice: the test proves nothing";
  EXPECT_EQ(routing.aux_loss.item<double>(), 0.0);
}

TEST(AuxFree, BiasMovesBySignOfLoadErrorAfterEachStep) {
  at::manual_seed(2);
  auto router = make("update_rate = 0.01\n", context_for(8, 4, 1));
  at::Tensor x = at::randn({40, 8}, at::kDouble);
  at::Tensor load = router->route(x).tokens_per_expert.to(at::kDouble);
  load += router->route(x).tokens_per_expert.to(at::kDouble);  // two micro-batches in one step
  router->after_optimizer_step();
  at::Tensor expected = 0.01 * at::sign(load.mean() - load);
  EXPECT_TRUE(at::allclose(router->buffers()[0].tensor, expected, 0, 1e-15)) << router->buffers()[0].tensor << expected;
  {
    at::NoGradGuard no_grad;  // evaluation: routes without counting toward the update
    router->route(x);
  }
  router->after_optimizer_step();
  EXPECT_TRUE(at::allclose(router->buffers()[0].tensor, expected, 0, 1e-15));
}

TEST(AuxFree, BalancesASkewedInputWhereTopKSoftmaxWithoutLossDoesNot) {
  at::manual_seed(1);
  const int64_t hidden = 16, experts = 8;
  auto router = make("update_rate = 0.01\n", context_for(hidden, experts, 2));
  at::Tensor x = at::randn({512, hidden}, at::kDouble) + 2.0;  // the same skew as topk_softmax's test
  double first = imbalance(router->route(x).tokens_per_expert);
  router->after_optimizer_step();
  std::vector<double> history{first};
  for (int step = 0; step < 200; ++step) {
    history.push_back(imbalance(router->route(x).tokens_per_expert));
    router->after_optimizer_step();
  }
  EXPECT_GT(first, 1.5) << "the input is not skewed enough to test balancing";
  EXPECT_LT(history.back(), 1.25) << "max/mean load " << first << " -> " << history.back();
  EXPECT_LT(history[50], first);
}
