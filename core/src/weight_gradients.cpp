// pithtrain::linear and the queue of deferred weight gradients that zero-bubble pipeline schedules
// (dualpipev) use to split a backward into its input-gradient and weight-gradient parts.
#include <atomic>
#include <mutex>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "pithtrain/nn.h"

namespace pithtrain {
namespace {

std::atomic<bool> deferral_enabled{false};
// The group a backward running inside WeightGradientQueue::defer adds to. A CUDA backward runs on the
// autograd engine's device thread, not the caller's, so this is process-wide (one backward at a time).
std::mutex capture_mutex;
std::vector<std::function<void()>>* capture = nullptr;

// at::linear whose weight gradient may be queued instead of computed: the weight must be a leaf (a
// parameter), whose .grad the queued work accumulates into as autograd would.
struct DeferrableLinear : public torch::autograd::Function<DeferrableLinear> {
  static at::Tensor forward(torch::autograd::AutogradContext* context, const at::Tensor& x, const at::Tensor& weight) {
    context->save_for_backward({x, weight});
    context->saved_data["weight"] = weight;  // the parameter itself, whose .grad a deferred update fills
    return at::linear(x, weight);
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* context, torch::autograd::tensor_list grads) {
    const auto saved = context->get_saved_variables();
    const at::Tensor x = saved[0], weight = saved[1];
    const at::Tensor grad = grads[0];                              // [..., out]
    const at::Tensor grad_rows = grad.reshape({-1, grad.size(-1)});  // [rows, out]
    at::Tensor grad_x, grad_weight;
    if (context->needs_input_grad(0)) grad_x = at::matmul(grad, weight);  // [..., in]
    if (context->needs_input_grad(1)) {
      const at::Tensor x_rows = x.reshape({-1, x.size(-1)});  // [rows, in]
      std::lock_guard<std::mutex> lock(capture_mutex);
      if (capture != nullptr) {
        // Later, outside autograd: accumulate into the parameter's .grad as AccumulateGrad would.
        capture->push_back([grad_rows, x_rows, parameter = context->saved_data["weight"].toTensor()]() mutable {
          at::NoGradGuard no_grad;
          at::Tensor update = grad_rows.t().mm(x_rows);  // [out, in]
          if (parameter.grad().defined())
            parameter.mutable_grad().add_(update);
          else
            parameter.mutable_grad() = update;
        });
      } else {
        grad_weight = grad_rows.t().mm(x_rows);  // [out, in]
      }
    }
    return {grad_x, grad_weight};
  }
};

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (!deferral_enabled.load(std::memory_order_relaxed) || !at::GradMode::is_enabled() || !weight.requires_grad() || !weight.is_leaf())
    return at::linear(x, weight, bias);
  // (Custom autograd functions take no undefined tensors: the bias, if any, is added outside.)
  at::Tensor out = DeferrableLinear::apply(x, weight);  // [..., out]
  return bias.defined() ? out + bias : out;
}

void WeightGradientQueue::enable_deferral(bool enabled) { deferral_enabled.store(enabled); }

void WeightGradientQueue::defer(const std::function<void()>& backward) {
  std::vector<std::function<void()>> group;
  {
    std::lock_guard<std::mutex> lock(capture_mutex);
    if (capture != nullptr) throw Error("WeightGradientQueue::defer: another backward is already deferring");
    capture = &group;
  }
  try {
    backward();
  } catch (...) {
    std::lock_guard<std::mutex> lock(capture_mutex);
    capture = nullptr;
    throw;
  }
  {
    std::lock_guard<std::mutex> lock(capture_mutex);
    capture = nullptr;
  }
  groups_.push_back(std::move(group));
}

void WeightGradientQueue::run_oldest() {
  if (groups_.empty()) throw Error("WeightGradientQueue::run_oldest: no deferred weight gradients are queued");
  std::vector<std::function<void()>> group = std::move(groups_.front());
  groups_.pop_front();
  for (auto& work : group) work();
}

}  // namespace pithtrain
