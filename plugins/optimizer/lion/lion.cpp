// Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675, Algorithm 2):
//   c = beta1 m + (1 - beta1) g;  p = p (1 - lr wd) - lr sign(c);  m = beta2 m + (1 - beta2) g.
// One momentum buffer (half AdamW's state); the update has unit size per element, so Lion wants a
// learning rate 3-10x smaller than AdamW's.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "pithtrain/optimizer.h"

namespace pithtrain {
namespace {

class Lion final : public Optimizer {
 public:
  Lion(Options& options, const PluginContext& context) : parameters_(context.parameters) {
    // 1 is allowed: beta2 = 1 keeps the momentum at zero (sign descent), beta1 = 1 steps along the momentum alone.
    beta1_ = options.number("beta1", 0.9, Range::closed(0, 1));
    beta2_ = options.number("beta2", 0.99, Range::closed(0, 1));
    weight_decay_ = options.number("weight_decay", 0.1, Range::at_least(0));
    for (const auto& parameter : parameters_)
      momentum_.push_back(at::zeros_like(parameter.tensor, at::MemoryFormat::Contiguous).detach());
  }

  void step(double lr) override {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < parameters_.size(); ++i) {
      at::Tensor param = parameters_[i].tensor;
      const at::Tensor& grad = param.grad();
      if (!grad.defined()) continue;
      at::Tensor direction = at::sign(momentum_[i] * beta1_ + grad * (1.0 - beta1_));
      if (parameters_[i].weight_decay && weight_decay_ != 0) param.mul_(1.0 - lr * weight_decay_);
      param.add_(direction, -lr);
      momentum_[i].mul_(beta2_).add_(grad, 1.0 - beta2_);
    }
  }

  std::vector<NamedTensor> state() override {
    std::vector<NamedTensor> result;
    for (size_t i = 0; i < parameters_.size(); ++i) result.push_back({parameters_[i].name + ".momentum", momentum_[i]});
    return result;
  }

 private:
  std::vector<Parameter> parameters_;
  std::vector<at::Tensor> momentum_;
  double beta1_ = 0.9, beta2_ = 0.99, weight_decay_ = 0.1;
};

}  // namespace

std::unique_ptr<Optimizer> make_lion_optimizer(Options& options, const PluginContext& context) {
  return std::make_unique<Lion>(options, context);
}

}  // namespace pithtrain
