// Runs the core's conformance suite (the same as `pithtrain plugin check`) on every plugin built.
#include <gtest/gtest.h>

#include <filesystem>

#include <ATen/ATen.h>

#include "pithtrain/conformance.h"
#include "pithtrain/router.h"
#include "registry.h"

namespace fs = std::filesystem;
using namespace pithtrain;

namespace {

std::vector<std::string> built_plugins() {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(PITHTRAIN_PLUGIN_DIR))
    if (entry.path().extension() == ".so") names.push_back(entry.path().stem().string());
  std::sort(names.begin(), names.end());
  return names;
}

class Conformance : public ::testing::TestWithParam<std::string> {};

}  // namespace

TEST_P(Conformance, EveryCheckPasses) {
  LoadedPlugin plugin = load_plugin_file(fs::path(PITHTRAIN_PLUGIN_DIR) / (GetParam() + ".so"));
  auto results = run_conformance(*plugin.descriptor);
  EXPECT_GE(results.size(), 1u);
  for (const auto& result : results) EXPECT_TRUE(result.passed) << result.name << ": " << result.detail;
}

TEST(ConformanceSuite, EveryKindIsCovered) {
  auto names = built_plugins();
  for (const auto& kind : kPluginKinds)
    EXPECT_TRUE(std::any_of(names.begin(), names.end(), [&](const std::string& name) { return name.rfind(kind + "_", 0) == 0; }))
        << "no " << kind << " plugin was built";
}

INSTANTIATE_TEST_SUITE_P(AllPlugins, Conformance, ::testing::ValuesIn(built_plugins()),
                         [](const auto& info) { return info.param; });

namespace {

// A router with two planted defects: its weights are cut off from the graph (no gradients reach the
// input or the gate) and it ignores the seed. The suite must notice both.
class DefectiveRouter final : public Router {
 public:
  explicit DefectiveRouter(const PluginContext& context) : dims_(context.dims) {
    gate_ = at::randn({dims_.num_experts, dims_.hidden_size}, at::TensorOptions().dtype(context.dtype)).requires_grad_(true);
  }
  Routing route(const at::Tensor& hidden) override {
    at::Tensor probs = at::softmax(at::linear(hidden, gate_), -1).detach() + at::rand({1}, hidden.options()) * 1e-3;
    auto [weights, ids] = at::topk(probs, dims_.top_k, -1);
    return {ids, weights, at::zeros({}, hidden.options()), at::bincount(ids.reshape(-1), {}, dims_.num_experts)};
  }
  std::vector<Parameter> parameters() override { return {{"gate", gate_, true}}; }

 private:
  ModelDims dims_;
  at::Tensor gate_;
};

std::unique_ptr<Router> make_defective(Options&, const PluginContext& context) {
  static uint64_t calls = 0;
  at::manual_seed(++calls);  // a different draw on every build: not deterministic
  return std::make_unique<DefectiveRouter>(context);
}

}  // namespace

TEST(ConformanceSuite, CatchesADefectiveRouter) {
  PluginDescriptor descriptor{.abi_version = kPluginAbiVersion, .kind = "router", .name = "defective", .version = "0",
                              .description = "", .torch_version = kTorchVersion, .make_router = &make_defective};
  std::map<std::string, bool> passed;
  for (const auto& result : run_conformance(descriptor)) passed[result.name] = result.passed;
  EXPECT_TRUE(passed.at("router: output shapes"));
  EXPECT_FALSE(passed.at("router: finite gradients"));
  EXPECT_FALSE(passed.at("router: determinism under a fixed seed"));
  EXPECT_FALSE(passed.at("router: double-precision gradient check"));
}
