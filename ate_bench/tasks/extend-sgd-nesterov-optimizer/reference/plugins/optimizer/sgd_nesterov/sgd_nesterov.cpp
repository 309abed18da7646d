// SGD with Nesterov momentum (Sutskever et al., ICML 2013, in the common "look-ahead gradient" form):
//   g = grad + wd p;  b = mu b + g;  p = p - lr (g + mu b).
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "pithtrain/optimizer.h"

namespace pithtrain {
namespace {

class SgdNesterov final : public Optimizer {
 public:
  SgdNesterov(Options& options, const PluginContext& context) : parameters_(context.parameters) {
    momentum_ = options.number("momentum", 0.9);
    weight_decay_ = options.number("weight_decay", 0.0);
    if (momentum_ < 0 || momentum_ >= 1) throw Error(options.where("momentum") + ": momentum must be in [0, 1)");
    for (const auto& parameter : parameters_)
      buffers_.push_back(at::zeros_like(parameter.tensor, at::MemoryFormat::Contiguous).detach());
  }

  void step(double lr) override {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < parameters_.size(); ++i) {
      at::Tensor param = parameters_[i].tensor;
      if (!param.grad().defined()) continue;
      at::Tensor grad = param.grad();
      if (parameters_[i].weight_decay && weight_decay_ != 0) grad = grad + param * weight_decay_;
      buffers_[i].mul_(momentum_).add_(grad);
      param.add_(grad + buffers_[i] * momentum_, -lr);
    }
  }

  std::vector<NamedTensor> state() override {
    std::vector<NamedTensor> result;
    for (size_t i = 0; i < parameters_.size(); ++i) result.push_back({parameters_[i].name + ".momentum", buffers_[i]});
    return result;
  }

 private:
  std::vector<Parameter> parameters_;
  std::vector<at::Tensor> buffers_;
  double momentum_ = 0.9, weight_decay_ = 0.0;
};

}  // namespace

std::unique_ptr<Optimizer> make_sgd_nesterov_optimizer(Options& options, const PluginContext& context) {
  return std::make_unique<SgdNesterov>(options, context);
}

}  // namespace pithtrain
