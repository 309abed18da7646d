// Hidden numeric test of extend-sgd-nesterov-optimizer: three steps with changing learning rates and
// gradients equal the update rule computed element by element; decay only where the parameter asks.
#include <cmath>

#include "hidden_common.h"
#include "pithtrain/optimizer.h"

int main(int argc, char** argv) {
  const auto* descriptor = hidden::load(argv[1]);
  at::manual_seed(3);
  at::Tensor decayed = at::randn({5}, at::kDouble).requires_grad_(true);
  at::Tensor plain = at::randn({2, 3}, at::kDouble).requires_grad_(true);
  pithtrain::PluginContext context;
  context.dtype = at::kDouble;
  context.parameters = {{"decayed", decayed, true}, {"plain", plain, false}};
  pithtrain::Options options = pithtrain::Options::from_string("momentum = 0.8\nweight_decay = 0.05\n", "hidden.toml");
  auto optimizer = descriptor->make_optimizer(options, context);
  options.check_unknown_keys("optimizer plugin 'sgd_nesterov'");
  hidden::expect(optimizer->state().size() == 2, "one momentum buffer per parameter in state()");
  std::vector<double> p1(decayed.data_ptr<double>(), decayed.data_ptr<double>() + 5);
  std::vector<double> p2(plain.data_ptr<double>(), plain.data_ptr<double>() + 6);
  std::vector<double> b1(5, 0.0), b2(6, 0.0);
  double worst = 0;
  for (double lr : {0.1, 0.05, 0.2}) {
    at::Tensor g1 = at::randn({5}, at::kDouble), g2 = at::randn({2, 3}, at::kDouble);
    decayed.mutable_grad() = g1.clone();
    plain.mutable_grad() = g2.clone();
    optimizer->step(lr);
    for (int i = 0; i < 5; ++i) {
      double g = g1[i].item<double>() + 0.05 * p1[i];
      b1[i] = 0.8 * b1[i] + g;
      p1[i] -= lr * (g + 0.8 * b1[i]);
      worst = std::max(worst, std::abs(decayed[i].item<double>() - p1[i]));
    }
    for (int i = 0; i < 6; ++i) {
      double g = g2.view(-1)[i].item<double>();
      b2[i] = 0.8 * b2[i] + g;
      p2[i] -= lr * (g + 0.8 * b2[i]);
      worst = std::max(worst, std::abs(plain.view(-1)[i].item<double>() - p2[i]));
    }
  }
  char detail[96];
  std::snprintf(detail, sizeof(detail), "three steps equal the update rule (max difference %.2e)", worst);
  hidden::expect(worst < 1e-12, detail);
  return hidden::finish();
}
