// The plugin loader and registry: every failure a user can meet gets a one-line error naming the file.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "pithtrain/router.h"
#include "plugin_names.h"
#include "registry.h"

namespace fs = std::filesystem;
using namespace pithtrain;

namespace {

const fs::path kPlugins = PITHTRAIN_PLUGIN_DIR;
const fs::path kBroken = PITHTRAIN_BROKEN_PLUGIN_DIR;

std::string load_error(const fs::path& file) {
  try {
    load_plugin_file(file);
  } catch (const Error& error) {
    return error.what();
  }
  return "(no error)";
}


fs::path fresh_dir(const std::string& name) {
  fs::path dir = fs::temp_directory_path() / ("pithtrain_test_loader_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

}  // namespace

TEST(Loader, LoadsAGoodPlugin) {
  LoadedPlugin plugin = load_plugin_file(kPlugins / "router_aux_free.so");
  EXPECT_EQ(plugin.kind(), "router");
  EXPECT_EQ(plugin.name(), "aux_free");
  EXPECT_EQ(plugin.descriptor->abi_version, kPluginAbiVersion);
  EXPECT_STREQ(plugin.descriptor->torch_version, kTorchVersion);
}

TEST(Loader, FileNotFound) {
  std::string message = load_error("/nonexistent/router_x.so");
  EXPECT_NE(message.find("/nonexistent/router_x.so: no such file"), std::string::npos) << message;
}

TEST(Loader, NotASharedLibrary) {
  fs::path file = fresh_dir("text") / "router_text.so";
  std::ofstream(file) << "this is not an ELF file\n";
  std::string message = load_error(file);
  EXPECT_NE(message.find(file.string()), std::string::npos) << message;
  EXPECT_NE(message.find("cannot be loaded as a shared library"), std::string::npos) << message;
}

TEST(Loader, EntrySymbolMissing) {
  std::string message = load_error(kBroken / "router_no_entry.so");
  EXPECT_NE(message.find("router_no_entry.so"), std::string::npos) << message;
  EXPECT_NE(message.find("has no entry symbol 'pithtrain_plugin'"), std::string::npos) << message;
}

TEST(Loader, AbiMismatchSaysBothVersions) {
  std::string message = load_error(kBroken / "router_bad_abi.so");
  EXPECT_NE(message.find("router_bad_abi.so"), std::string::npos) << message;
  EXPECT_NE(message.find("plugin ABI " + std::to_string(kPluginAbiVersion + 1) + ", this pithtrain supports " +
                         std::to_string(kPluginAbiVersion)),
            std::string::npos)
      << message;
}

TEST(Loader, TorchVersionMismatch) {
  std::string message = load_error(kBroken / "router_old_torch.so");
  EXPECT_NE(message.find("built against LibTorch 1.13.1, this pithtrain uses LibTorch " + std::string(kTorchVersion)),
            std::string::npos)
      << message;
}

TEST(Loader, NameMustMatchFileName) {
  std::string message = load_error(kBroken / "router_misnamed.so");
  EXPECT_NE(message.find("name 'something_else'"), std::string::npos) << message;
  EXPECT_NE(message.find("rename the file to router_something_else.so"), std::string::npos) << message;
}

TEST(Loader, FileNameMustFollowTheConvention) {
  fs::path file = fresh_dir("naming") / "my_plugin.so";
  fs::copy_file(kPlugins / "router_aux_free.so", file);
  std::string message = load_error(file);
  EXPECT_NE(message.find("<kind>_<name>.so"), std::string::npos) << message;
}

TEST(Registry, UnknownNameListsAvailableAndSearchPath) {
  PluginRegistry registry({kPlugins}, {});
  try {
    registry.get("router", "nonexistent");
    FAIL() << "expected an error";
  } catch (const Error& error) {
    std::string message = error.what();
    EXPECT_NE(message.find("unknown router plugin 'nonexistent'"), std::string::npos) << message;
    EXPECT_NE(message.find("available: " + router_names_in(kPlugins) + ";"), std::string::npos) << message;
    EXPECT_NE(message.find(kPlugins.string()), std::string::npos) << message;
  }
}

TEST(Registry, DuplicateNameNamesBothPaths) {
  fs::path other = fresh_dir("duplicate");
  fs::copy_file(kPlugins / "router_aux_free.so", other / "router_aux_free.so");
  PluginRegistry registry({kPlugins, other}, {});
  try {
    registry.get("router", "aux_free");
    FAIL() << "expected an error";
  } catch (const Error& error) {
    std::string message = error.what();
    EXPECT_NE(message.find("two files provide router plugin 'aux_free'"), std::string::npos) << message;
    EXPECT_NE(message.find((kPlugins / "router_aux_free.so").string()), std::string::npos) << message;
    EXPECT_NE(message.find((other / "router_aux_free.so").string()), std::string::npos) << message;
  }
  // The other plugins are still usable: a duplicate only blocks its own name.
  EXPECT_NO_THROW(registry.get("router", "topk_softmax"));
}

TEST(Registry, ExplicitBareNameIsFoundOnTheSearchPath) {
  PluginRegistry registry({kPlugins}, {"router_aux_free.so"});
  EXPECT_EQ(registry.get("router", "aux_free").file, fs::canonical(kPlugins / "router_aux_free.so"));
}

TEST(Registry, ExplicitPathOutsideTheSearchPathIsUsed) {
  fs::path other = fresh_dir("explicit");
  fs::copy_file(kPlugins / "router_topk_softmax.so", other / "router_topk_softmax.so");
  PluginRegistry registry({other.parent_path() / "empty_dir_that_does_not_exist"}, {(other / "router_topk_softmax.so").string()});
  EXPECT_EQ(registry.get("router", "topk_softmax").file, fs::canonical(other / "router_topk_softmax.so"));
}

TEST(Registry, ExplicitMissingFileIsAnError) {
  EXPECT_THROW(PluginRegistry({kPlugins}, {"router_nope.so"}), Error);
  EXPECT_THROW(PluginRegistry({kPlugins}, {"/nonexistent/router_nope.so"}), Error);
}

TEST(Registry, ExplicitBrokenPluginFailsAtStartUp) {
  try {
    PluginRegistry registry({kPlugins}, {(kBroken / "router_bad_abi.so").string()});
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("plugin ABI"), std::string::npos) << error.what();
  }
}

TEST(Registry, LoadAllFindsEveryPluginInTheFolder) {
  PluginRegistry registry({kPlugins}, {});
  std::set<std::string> found, files;
  for (const auto* plugin : registry.load_all()) found.insert(plugin->kind() + "_" + plugin->name());
  for (const auto& entry : fs::directory_iterator(kPlugins))
    if (entry.path().extension() == ".so") files.insert(entry.path().stem().string());
  EXPECT_EQ(found, files) << "every <kind>_<name>.so of the folder, whichever are installed";
  for (const auto& kind : kPluginKinds)  // the build ships at least one plugin of each kind
    EXPECT_FALSE(registry.names_of_kind(kind).empty()) << kind;
}

TEST(Registry, FactoryFailureAndUnknownPluginKeysAreErrors) {
  PluginRegistry registry({kPlugins}, {});
  PluginContext context;
  context.dims.hidden_size = 8;
  context.dims.num_experts = 4;
  context.dims.top_k = 2;
  Options options = Options::from_string("[router]\nplugin = \"aux_free\"\nupdate_rat = 0.1\n", "cfg.toml");
  Options router = options.table("router");
  router.text("plugin", "");
  try {
    make_router(registry.get("router", "aux_free"), router, context);
    FAIL() << "expected an error";
  } catch (const Error& error) {
    std::string message = error.what();
    EXPECT_NE(message.find("cfg.toml:3"), std::string::npos) << message;
    EXPECT_NE(message.find("did you mean 'router.update_rate'"), std::string::npos) << message;
    EXPECT_NE(message.find("router plugin 'aux_free'"), std::string::npos) << message;
  }
  Options bad_value = Options::from_string("[router]\nupdate_rate = -1.0\n", "cfg.toml");
  Options bad_router = bad_value.table("router");
  try {
    make_router(registry.get("router", "aux_free"), bad_router, context);
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("cfg.toml:2: router.update_rate = -1 is out of range: it must be >= 0"),
              std::string::npos) << error.what();
  }
}
