// grouped equals the reference layout `loop` (loaded from its built plugin) in outputs and gradients.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/grad_mode.h>

#include "pithtrain/experts.h"
#include "registry.h"

using namespace pithtrain;

namespace {

struct Result {
  at::Tensor out, grad_x, grad_weights;
  std::vector<at::Tensor> grad_parameters;
};

Result run(Experts& experts, const at::Tensor& x_in, const Routing& routing_in, const at::Tensor& probe) {
  at::Tensor x = x_in.detach().clone().requires_grad_(true);
  Routing routing = routing_in;
  routing.weights = routing_in.weights.detach().clone().requires_grad_(true);
  at::Tensor out = experts.forward(x, routing);
  (out * probe).sum().backward();
  Result result{out.detach(), x.grad(), routing.weights.grad(), {}};
  for (auto& parameter : experts.parameters()) result.grad_parameters.push_back(parameter.tensor.grad());
  return result;
}

void compare(c10::ScalarType dtype, double tolerance, int64_t tokens, bool leave_an_expert_empty, const std::string& toml = "") {
  PluginContext context;
  context.dims = {.hidden_size = 16, .num_layers = 2, .num_experts = 6, .top_k = 2, .expert_hidden_size = 8, .init_std = 0.3};
  context.dtype = dtype;
  Options options = Options::from_string(toml, "test.toml");
  auto grouped = pithtrain_plugin()->make_experts(options, context);
  LoadedPlugin loop_plugin = load_plugin_file(std::string(PITHTRAIN_PLUGIN_DIR) + "/experts_loop.so");
  auto loop = loop_plugin.descriptor->make_experts(options, context);
  {
    at::NoGradGuard no_grad;  // same weights in both layouts: the parameter names and shapes are shared
    auto from = grouped->parameters(), to = loop->parameters();
    ASSERT_EQ(from.size(), to.size());
    for (size_t i = 0; i < from.size(); ++i) {
      ASSERT_EQ(from[i].name, to[i].name);
      if (from[i].name.find("bias") != std::string::npos) from[i].tensor.normal_(0.0, 0.5);  // zero at init
      to[i].tensor.copy_(from[i].tensor);
    }
  }
  at::Tensor x = at::randn({tokens, 16}, dtype);
  Routing routing;
  routing.expert_ids = at::stack({at::randint(0, 3, {tokens}, at::kLong), at::randint(3, leave_an_expert_empty ? 5 : 6, {tokens}, at::kLong)}, 1);
  routing.weights = at::rand({tokens, 2}, dtype);
  at::Tensor probe = at::randn({tokens, 16}, dtype);
  Result a = run(*grouped, x, routing, probe), b = run(*loop, x, routing, probe);
  EXPECT_TRUE(at::allclose(a.out, b.out, tolerance, tolerance)) << (a.out - b.out).abs().max();
  EXPECT_TRUE(at::allclose(a.grad_x, b.grad_x, tolerance, tolerance)) << (a.grad_x - b.grad_x).abs().max();
  EXPECT_TRUE(at::allclose(a.grad_weights, b.grad_weights, tolerance, tolerance));
  for (size_t i = 0; i < a.grad_parameters.size(); ++i)
    EXPECT_TRUE(at::allclose(a.grad_parameters[i], b.grad_parameters[i], tolerance, tolerance)) << "parameter " << i;
}

}  // namespace

TEST(GroupedExperts, EqualsLoopInDouble) {
  at::manual_seed(0);
  compare(at::kDouble, 1e-12, 37, false);
}

TEST(GroupedExperts, EqualsLoopInFloat) {
  at::manual_seed(1);
  compare(at::kFloat, 1e-5, 300, false);
}

TEST(GroupedExperts, EqualsLoopWithAnExpertThatGetsNoTokens) {
  at::manual_seed(2);
  compare(at::kDouble, 1e-12, 20, true);
}

TEST(GroupedExperts, EqualsLoopWithClampedSwigluAndBiases) {
  at::manual_seed(3);
  compare(at::kDouble, 1e-12, 40, true, "activation = \"clamped_swiglu\"\nbias = true\nswiglu_limit = 0.5\n");
}

// On a GPU the fused path (kernels for the permutation, combine and activation, grouped GEMMs) equals
// `loop` on the CPU with the same weights, outputs and gradients; skipped without a GPU.
TEST(GroupedExperts, FusedCudaPathEqualsLoopOnTheCpu) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device on this machine";
  for (const std::string toml : {"", "activation = \"clamped_swiglu\"\nbias = true\n"}) {
    at::manual_seed(3);
    PluginContext cpu_context;
    cpu_context.dims = {.hidden_size = 16, .num_layers = 2, .num_experts = 6, .top_k = 2, .expert_hidden_size = 8, .init_std = 0.3};
    cpu_context.dtype = at::kFloat;
    PluginContext gpu_context = cpu_context;
    gpu_context.device = at::Device(at::kCUDA, 0);
    Options options = Options::from_string(toml, "test.toml");
    auto grouped = pithtrain_plugin()->make_experts(options, gpu_context);
    LoadedPlugin loop_plugin = load_plugin_file(std::string(PITHTRAIN_PLUGIN_DIR) + "/experts_loop.so");
    auto loop = loop_plugin.descriptor->make_experts(options, cpu_context);
    {
      at::NoGradGuard no_grad;
      auto from = loop->parameters(), to = grouped->parameters();
      for (size_t i = 0; i < from.size(); ++i) {
        if (from[i].name.find("bias") != std::string::npos) from[i].tensor.normal_(0.0, 0.5);
        to[i].tensor.copy_(from[i].tensor);
      }
    }
    const int64_t tokens = 40;
    at::Tensor x = at::randn({tokens, 16});
    Routing routing;
    routing.expert_ids = at::stack({at::randint(0, 3, {tokens}, at::kLong), at::randint(3, 6, {tokens}, at::kLong)}, 1);
    routing.weights = at::rand({tokens, 2});
    at::Tensor probe = at::randn({tokens, 16});
    Routing on_gpu = routing;
    on_gpu.expert_ids = routing.expert_ids.cuda(), on_gpu.weights = routing.weights.cuda();
    Result a = run(*grouped, x.cuda(), on_gpu, probe.cuda()), b = run(*loop, x, routing, probe);
    EXPECT_TRUE(at::allclose(a.out.cpu(), b.out, 1e-4, 1e-4)) << toml;
    EXPECT_TRUE(at::allclose(a.grad_x.cpu(), b.grad_x, 1e-4, 1e-4)) << toml;
    EXPECT_TRUE(at::allclose(a.grad_weights.cpu(), b.grad_weights, 1e-4, 1e-4)) << toml;
    for (size_t i = 0; i < a.grad_parameters.size(); ++i)
      EXPECT_TRUE(at::allclose(a.grad_parameters[i].cpu(), b.grad_parameters[i], 1e-4, 1e-4)) << toml << " parameter " << i;
  }
}
