// topk_softmax against a plain reference, and its balance behaviour without the loss.
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

TEST(TopKSoftmax, MatchesAPlainReference) {
  at::manual_seed(0);
  const int64_t tokens = 7, hidden = 5, experts = 6, k = 3;
  for (auto [renormalize, bias] : {std::pair{true, false}, {false, false}, {true, true}}) {
    auto router = make(std::string("renormalize = ") + (renormalize ? "true" : "false") + "\naux_loss_coeff = 0.1\nbias = " +
                           (bias ? "true" : "false") + "\n",
                       context_for(hidden, experts, k));
    ASSERT_EQ(router->parameters().size(), bias ? 2u : 1u);
    std::vector<double> logit_bias(experts, 0.0);
    if (bias) {
      at::NoGradGuard no_grad;  // zero at init: give it values that change the choice
      router->parameters()[1].tensor.normal_(0.0, 2.0);
      for (int64_t e = 0; e < experts; ++e) logit_bias[e] = router->parameters()[1].tensor[e].item<double>();
    }
    at::Tensor x = at::randn({tokens, hidden}, at::kDouble);
    Routing routing = router->route(x);
    at::Tensor gate = router->parameters()[0].tensor.detach();
    auto* xs = x.data_ptr<double>();
    auto* gs = gate.contiguous().data_ptr<double>();
    std::vector<double> count(experts, 0), mean_prob(experts, 0);
    for (int64_t t = 0; t < tokens; ++t) {
      std::vector<double> logits(experts), probs(experts);
      double max_logit = -1e300, total = 0;
      for (int64_t e = 0; e < experts; ++e) {
        logits[e] = logit_bias[e];
        for (int64_t h = 0; h < hidden; ++h) logits[e] += xs[t * hidden + h] * gs[e * hidden + h];
        max_logit = std::max(max_logit, logits[e]);
      }
      for (int64_t e = 0; e < experts; ++e) total += probs[e] = std::exp(logits[e] - max_logit);
      for (auto& p : probs) p /= total;
      std::vector<int64_t> order(experts);
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return probs[a] > probs[b]; });
      double chosen_total = 0;
      for (int64_t j = 0; j < k; ++j) chosen_total += probs[order[j]];
      for (int64_t j = 0; j < k; ++j) {
        EXPECT_EQ(routing.expert_ids[t][j].item<int64_t>(), order[j]);
        double expected = renormalize ? probs[order[j]] / chosen_total : probs[order[j]];
        EXPECT_NEAR(routing.weights[t][j].item<double>(), expected, 1e-12);
        count[order[j]] += 1;
      }
      for (int64_t e = 0; e < experts; ++e) mean_prob[e] += probs[e] / tokens;
    }
    double aux = 0;
    for (int64_t e = 0; e < experts; ++e) aux += count[e] / (tokens * k) * mean_prob[e];
    EXPECT_NEAR(routing.aux_loss.item<double>(), 0.1 * experts * aux, 1e-12);
    for (int64_t e = 0; e < experts; ++e) EXPECT_EQ(routing.tokens_per_expert[e].item<int64_t>(), count[e]);
  }
}

TEST(TopKSoftmax, WithoutItsLossASkewedRouterStaysSkewed) {
  at::manual_seed(1);
  const int64_t hidden = 16, experts = 8;
  auto router = make("aux_loss_coeff = 0.0\n", context_for(hidden, experts, 2));
  at::Tensor x = at::randn({512, hidden}, at::kDouble) + 2.0;  // a shared direction skews every token alike
  double first = imbalance(router->route(x).tokens_per_expert);
  for (int step = 0; step < 50; ++step) {
    router->route(x);
    router->after_optimizer_step();
  }
  Routing last = router->route(x);
  EXPECT_GT(first, 1.5) << "the input is not skewed enough to test balancing";
  EXPECT_DOUBLE_EQ(imbalance(last.tokens_per_expert), first);
  EXPECT_EQ(last.aux_loss.item<double>(), 0.0);
}
