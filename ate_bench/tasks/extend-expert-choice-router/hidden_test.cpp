// Hidden numeric test of extend-expert-choice-router: dense [tokens, experts] weights equal a reference
// that lets each expert pick its top-C tokens, one expert at a time.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "hidden_common.h"
#include "pithtrain/router.h"

int main(int argc, char** argv) {
  const auto* descriptor = hidden::load(argv[1]);
  int all_unpicked = 0, all_overfull = 0;
  for (double capacity_factor : {1.0, 0.5}) {
    at::manual_seed(11);
    pithtrain::PluginContext context;
    context.dims = {.hidden_size = 8, .num_layers = 1, .num_experts = 5, .top_k = 2, .init_std = 0.6};
    context.dtype = at::kDouble;
    pithtrain::Options options = pithtrain::Options::from_string("capacity_factor = " + std::to_string(capacity_factor), "hidden.toml");
    auto router = descriptor->make_router(options, context);
    options.check_unknown_keys("router plugin 'expert_choice'");
    at::Tensor gate = hidden::parameter(router->parameters(), "gate.weight");
    const int64_t tokens = 23, experts = 5, k = 2;
    at::Tensor x = at::randn({tokens, 8}, at::kDouble);
    pithtrain::Routing routing = router->route(x);
    at::Tensor dense = at::zeros({tokens, experts}, at::kDouble);
    dense.index_put_({at::arange(tokens).unsqueeze(1).expand({tokens, k}).reshape(-1), routing.expert_ids.reshape(-1)},
                     routing.weights.detach().reshape(-1), /*accumulate=*/true);
    // Reference: softmax per token, each expert picks its top-C tokens, a token keeps its top-k pickers.
    std::vector<std::vector<double>> prob(tokens, std::vector<double>(experts));
    for (int64_t t = 0; t < tokens; ++t) {
      double max_logit = -1e300, total = 0;
      std::vector<double> logits(experts);
      for (int64_t e = 0; e < experts; ++e) {
        for (int64_t h = 0; h < 8; ++h) logits[e] += x[t][h].item<double>() * gate[e][h].item<double>();
        max_logit = std::max(max_logit, logits[e]);
      }
      for (int64_t e = 0; e < experts; ++e) total += prob[t][e] = std::exp(logits[e] - max_logit);
      for (auto& p : prob[t]) p /= total;
    }
    const int64_t capacity = std::min<int64_t>(tokens, std::max<int64_t>(1, std::ceil(capacity_factor * tokens * k / experts)));
    std::vector<std::vector<int>> pickers(tokens);
    for (int64_t e = 0; e < experts; ++e) {
      std::vector<int> order(tokens);
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(), [&](int a, int b) { return prob[a][e] > prob[b][e]; });
      for (int64_t c = 0; c < capacity; ++c) pickers[order[c]].push_back(e);
    }
    double worst = 0;
    int unpicked = 0, overfull = 0;
    for (int64_t t = 0; t < tokens; ++t) {
      auto& chosen = pickers[t];
      unpicked += chosen.empty();
      overfull += chosen.size() > static_cast<size_t>(k);
      std::sort(chosen.begin(), chosen.end(), [&](int a, int b) { return prob[t][a] > prob[t][b]; });
      if (chosen.size() > static_cast<size_t>(k)) chosen.resize(k);
      std::vector<double> expected(experts, 0.0);
      for (int e : chosen) expected[e] = prob[t][e];
      for (int64_t e = 0; e < experts; ++e) worst = std::max(worst, std::abs(dense[t][e].item<double>() - expected[e]));
    }
    char detail[160];
    std::snprintf(detail, sizeof(detail), "capacity_factor %.1f (C = %lld; %d tokens unpicked, %d picked by more than top_k): "
                  "max weight difference %.2e", capacity_factor, static_cast<long long>(capacity), unpicked, overfull, worst);
    hidden::expect(worst < 1e-9, detail);
    all_unpicked += unpicked, all_overfull += overfull;
  }
  hidden::expect(all_unpicked > 0 && all_overfull > 0, "the test data has unpicked tokens and tokens picked by more than top_k");
  return hidden::finish();
}
