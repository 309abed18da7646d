// Hidden numeric test of extend-top-any-router: the plugin's routing equals a per-token reference of the
// task's formula, compared as dense [tokens, experts] weight matrices (slot order is free).
#include <cmath>

#include "hidden_common.h"
#include "pithtrain/router.h"

int main(int argc, char** argv) {
  const auto* descriptor = hidden::load(argv[1]);
  at::manual_seed(7);
  pithtrain::PluginContext context;
  context.dims = {.hidden_size = 8, .num_layers = 1, .num_experts = 6, .top_k = 3, .init_std = 0.5};
  context.dtype = at::kDouble;
  pithtrain::Options options = pithtrain::Options::from_string("", "hidden.toml");
  auto router = descriptor->make_router(options, context);
  auto parameters = router->parameters();
  at::Tensor gate = hidden::parameter(parameters, "gate.weight"), threshold = hidden::parameter(parameters, "threshold");
  hidden::expect(gate.sizes() == at::IntArrayRef({6, 8}) && threshold.sizes() == at::IntArrayRef({6}),
                 "gate.weight [6, 8] and threshold [6]");
  {
    at::NoGradGuard no_grad;
    threshold.copy_(at::tensor({-0.6, 0.5, 0.0, 0.3, -0.2, 0.8}, at::kDouble));
  }
  const int64_t tokens = 60, experts = 6, k = 3;
  at::Tensor x = at::randn({tokens, 8}, at::kDouble);
  pithtrain::Routing routing = router->route(x);
  hidden::expect(routing.expert_ids.sizes() == at::IntArrayRef({tokens, k}), "expert_ids [tokens, top_k]");
  at::Tensor dense = at::zeros({tokens, experts}, at::kDouble);
  dense.index_put_({at::arange(tokens).unsqueeze(1).expand({tokens, k}).reshape(-1), routing.expert_ids.reshape(-1)},
                   routing.weights.detach().reshape(-1), /*accumulate=*/true);
  int none = 0, over = 0, some = 0;
  double worst = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<double> score(experts), margin(experts), expected(experts, 0.0);
    double x_norm = x[t].norm().item<double>();
    std::vector<int> chosen;
    for (int64_t e = 0; e < experts; ++e) {
      double dot = 0, w_norm = gate[e].norm().item<double>();
      for (int64_t h = 0; h < 8; ++h) dot += x[t][h].item<double>() * gate[e][h].item<double>();
      score[e] = 1 / (1 + std::exp(-dot / (x_norm * w_norm)));
      margin[e] = score[e] - 1 / (1 + std::exp(-threshold[e].item<double>()));
      if (margin[e] > 0) chosen.push_back(e);
    }
    std::sort(chosen.begin(), chosen.end(), [&](int a, int b) { return score[a] > score[b]; });
    if (chosen.empty()) {
      ++none;
      expected[std::max_element(score.begin(), score.end()) - score.begin()] = 1.0;
    } else {
      over += chosen.size() > static_cast<size_t>(k);
      some += chosen.size() <= static_cast<size_t>(k);
      if (chosen.size() > static_cast<size_t>(k)) chosen.resize(k);
      double total = 0;
      for (int e : chosen) total += margin[e];
      for (int e : chosen) expected[e] = margin[e] / total;
    }
    for (int64_t e = 0; e < experts; ++e) worst = std::max(worst, std::abs(dense[t][e].item<double>() - expected[e]));
    at::Tensor ids = std::get<0>(routing.expert_ids[t].sort());
    if ((ids.narrow(0, 1, k - 1) == ids.narrow(0, 0, k - 1)).any().item<bool>()) hidden::expect(false, "distinct experts per token");
  }
  std::printf("  tokens: %d select none, %d select more than top_k, %d select 1..top_k\n", none, over, some);
  hidden::expect(none > 0 && over > 0 && some > 0, "the test data covers all three cases");
  char detail[64];
  std::snprintf(detail, sizeof(detail), "weights equal the reference (max difference %.2e)", worst);
  hidden::expect(worst < 1e-9, detail);
  return hidden::finish();
}
