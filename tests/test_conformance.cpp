// Runs the core's conformance suite (the same as `pithtrain plugin check`) on every plugin built.
#include <gtest/gtest.h>

#include <filesystem>

#include "pithtrain/conformance.h"
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
