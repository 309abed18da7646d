// A router whose configured loss does not reach training, the way real MoE trainers have lost their aux
// loss: `defect = "detached"` reports a term cut from the graph, "unreported" adds a loss to aux_loss
// without naming it as a term. The core must refuse both at the first step. `defect = "lopsided"` is a
// correct-loss router that sends every token to experts 0..k-1 (for the dead-expert diagnostics).
#include <ATen/ATen.h>

#include "pithtrain/nn.h"
#include "pithtrain/router.h"

namespace {

class SilentLossRouter final : public pithtrain::Router {
 public:
  SilentLossRouter(pithtrain::Options& options, const pithtrain::PluginContext& context) : dims_(context.dims) {
    defect_ = options.text("defect", "detached");
    gate_ = pithtrain::normal_parameter({dims_.num_experts, dims_.hidden_size}, dims_.init_std, context);
  }
  pithtrain::Routing route(const at::Tensor& hidden) override {
    at::Tensor probs = at::softmax(at::linear(hidden, gate_).to(at::kFloat), -1);
    auto [weights, ids] = at::topk(probs, dims_.top_k, -1);
    if (defect_ == "lopsided") ids = at::arange(dims_.top_k, ids.options()).expand_as(ids).contiguous();
    pithtrain::Routing routing{ids, weights.to(hidden.scalar_type()), {}, at::bincount(ids.reshape(-1), {}, dims_.num_experts)};
    at::Tensor loss = 0.01 * pithtrain::switch_balance_loss(probs, ids);
    if (defect_ == "lopsided") {
      routing.loss_terms.push_back({"switch", loss});
      routing.aux_loss = loss;
    } else if (defect_ == "detached") {
      routing.loss_terms.push_back({"switch", loss.detach()});
      routing.aux_loss = loss.detach();
    } else {
      routing.aux_loss = loss;  // applied but never reported
    }
    return routing;
  }
  std::vector<pithtrain::Parameter> parameters() override { return {{"gate.weight", gate_, true}}; }

 private:
  pithtrain::ModelDims dims_;
  std::string defect_;
  at::Tensor gate_;
};

std::unique_ptr<pithtrain::Router> make(pithtrain::Options& options, const pithtrain::PluginContext& context) {
  return std::make_unique<SilentLossRouter>(options, context);
}

}  // namespace

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "router",
      .name = "silent_loss",
      .version = "0.0.1",
      .description = "a router whose loss silently does not train (for tests)",
      .torch_version = pithtrain::kTorchVersion,
      .make_router = &make,
  };
  return &descriptor;
}
