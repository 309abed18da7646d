// AdamW (Loshchilov & Hutter, arXiv:1711.05101): Adam moments with weight decay applied to the weights
// directly, p <- p * (1 - lr * weight_decay), skipped for parameters marked weight_decay = false.
#include <map>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "pithtrain/optimizer.h"

namespace pithtrain {
namespace {

class AdamW final : public Optimizer {
 public:
  AdamW(Options& options, const PluginContext& context) : parameters_(context.parameters) {
    beta1_ = options.number("beta1", 0.9, Range::half_open(0, 1));
    beta2_ = options.number("beta2", 0.95, Range::half_open(0, 1));
    eps_ = options.number("eps", 1e-8, Range::above(0));
    weight_decay_ = options.number("weight_decay", 0.1, Range::at_least(0));
    for (const auto& parameter : parameters_) {
      exp_avg_.push_back(at::zeros_like(parameter.tensor, at::MemoryFormat::Contiguous).detach());
      exp_avg_sq_.push_back(at::zeros_like(parameter.tensor, at::MemoryFormat::Contiguous).detach());
      steps_.push_back(at::zeros({}, at::kLong));
    }
  }

  void step(double lr) override {
    at::NoGradGuard no_grad;
    // LibTorch's fused AdamW (one kernel over a list of tensors) for each group of parameters with
    // gradients sharing weight decay, dtype and device; the optimizer's tensors are float32 master copies.
    std::map<std::tuple<bool, int, std::string>, std::vector<size_t>> groups;
    for (size_t i = 0; i < parameters_.size(); ++i) {
      const at::Tensor& param = parameters_[i].tensor;
      if (!param.grad().defined()) continue;
      groups[{parameters_[i].weight_decay && weight_decay_ != 0, static_cast<int>(param.scalar_type()), param.device().str()}].push_back(i);
    }
    for (const auto& [key, members] : groups) {
      std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
      for (size_t i : members) {
        steps_[i] += 1;
        params.push_back(parameters_[i].tensor), grads.push_back(parameters_[i].tensor.grad());
        exp_avgs.push_back(exp_avg_[i]), exp_avg_sqs.push_back(exp_avg_sq_[i]);
        steps.push_back(steps_[i].to(at::TensorOptions().dtype(at::kFloat).device(parameters_[i].tensor.device())));
      }
      at::_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, {}, steps, lr, beta1_, beta2_, std::get<0>(key) ? weight_decay_ : 0.0,
                        eps_, /*amsgrad=*/false, /*maximize=*/false);
    }
  }

  std::vector<NamedTensor> state() override {
    std::vector<NamedTensor> result;
    for (size_t i = 0; i < parameters_.size(); ++i) {
      result.push_back({parameters_[i].name + ".exp_avg", exp_avg_[i]});
      result.push_back({parameters_[i].name + ".exp_avg_sq", exp_avg_sq_[i]});
      result.push_back({parameters_[i].name + ".step", steps_[i]});
    }
    return result;
  }

 private:
  std::vector<Parameter> parameters_;
  std::vector<at::Tensor> exp_avg_, exp_avg_sq_, steps_;
  double beta1_ = 0.9, beta2_ = 0.95, eps_ = 1e-8, weight_decay_ = 0.1;
};

}  // namespace

std::unique_ptr<Optimizer> make_adamw_optimizer(Options& options, const PluginContext& context) {
  return std::make_unique<AdamW>(options, context);
}

}  // namespace pithtrain
