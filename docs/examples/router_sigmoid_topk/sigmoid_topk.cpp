// A complete out-of-tree router plugin: sigmoid scores, top-k, weights normalised over the chosen k,
// no balancing loss. Build it with the CMakeLists.txt beside it; check it with `pithtrain plugin check`.
#include <ATen/ATen.h>

#include "pithtrain/nn.h"
#include "pithtrain/router.h"

namespace {

class SigmoidTopKRouter final : public pithtrain::Router {
 public:
  SigmoidTopKRouter(pithtrain::Options& options, const pithtrain::PluginContext& context) : dims_(context.dims) {
    // Every key read here is a valid TOML key; a value outside its range is refused with file, line and range.
    temperature_ = options.number("temperature", 1.0, pithtrain::Range::above(0));
    gate_ = pithtrain::normal_parameter({dims_.num_experts, dims_.hidden_size}, dims_.init_std, context);  // [E, H]
  }

  pithtrain::Routing route(const at::Tensor& hidden) override {  // hidden [T, H]
    at::Tensor scores = at::sigmoid(at::linear(hidden, gate_) / temperature_);  // [T, E]
    auto [chosen, expert_ids] = at::topk(scores, dims_.top_k, -1);              // [T, k]
    pithtrain::Routing routing;
    routing.expert_ids = expert_ids;
    routing.weights = chosen / chosen.sum(-1, /*keepdim=*/true);
    routing.aux_loss = at::zeros({}, scores.options());
    routing.tokens_per_expert = at::bincount(expert_ids.reshape(-1), {}, dims_.num_experts);
    return routing;
  }

  std::vector<pithtrain::Parameter> parameters() override { return {{"gate.weight", gate_, true}}; }

 private:
  pithtrain::ModelDims dims_;
  double temperature_ = 1.0;
  at::Tensor gate_;
};

std::unique_ptr<pithtrain::Router> make(pithtrain::Options& options, const pithtrain::PluginContext& context) {
  return std::make_unique<SigmoidTopKRouter>(options, context);
}

}  // namespace

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "router",
      .name = "sigmoid_topk",
      .version = "0.1.0",
      .description = "example out-of-tree router: sigmoid scores, top-k, normalised weights",
      .torch_version = pithtrain::kTorchVersion,
      .make_router = &make,
  };
  return &descriptor;
}
