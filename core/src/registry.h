// The plugin registry: finds plugin files on the search path, loads them with Boost.DLL, validates
// their descriptors, and builds components through their factories.
#pragma once
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "pithtrain/plugin.h"

namespace pithtrain {

inline const std::vector<std::string> kPluginKinds = {"router", "experts", "attention", "optimizer", "schedule"};

struct LoadedPlugin {
  std::filesystem::path file;
  const PluginDescriptor* descriptor = nullptr;
  std::string kind() const { return descriptor->kind; }
  std::string name() const { return descriptor->name; }
};

// Loads one plugin file and validates it (entry symbol, ABI and LibTorch versions, kind and name
// against the file name "<kind>_<name>.so"); throws Error naming the file on any failure. The library
// stays loaded for the life of the process.
LoadedPlugin load_plugin_file(const std::filesystem::path& file);

class PluginRegistry {
 public:
  // `search_dirs` in priority order; `explicit_files` from --plugins: a bare file name is looked up in
  // the search dirs, a path is used as given. Explicit files are loaded (and validated) at once.
  PluginRegistry(std::vector<std::filesystem::path> search_dirs, const std::vector<std::string>& explicit_files);

  // The plugin `name` of `kind`, loaded on first use. Throws Error listing the available names of that
  // kind and the search path when there is none, and both paths when two files provide it.
  const LoadedPlugin& get(const std::string& kind, const std::string& name);
  // The same, the error prefixed with `where` (the config file and line of the key that named it).
  const LoadedPlugin& get(const std::string& kind, const std::string& name, const std::string& where);
  // Loads every plugin found (for `pithtrain plugins`).
  std::vector<const LoadedPlugin*> load_all();
  std::vector<std::string> names_of_kind(const std::string& kind) const;
  const std::vector<std::filesystem::path>& search_dirs() const { return search_dirs_; }

 private:
  std::string search_path_text() const;
  std::vector<std::filesystem::path> search_dirs_;
  std::map<std::string, std::vector<std::filesystem::path>> files_;  // "<kind>_<name>" -> files found
  std::map<std::string, LoadedPlugin> loaded_;
};

// The default search path: the build's plugin folder, $PITHTRAIN_PLUGIN_PATH (colon-separated), then
// `config_paths` (config plugins.paths).
std::vector<std::filesystem::path> default_search_dirs(const std::vector<std::string>& config_paths);

// Builders: call the plugin's factory, turn anything it throws into an Error naming the plugin, and
// check that every key of `options` was read by it.
std::unique_ptr<class Router> make_router(const LoadedPlugin& plugin, Options& options, const PluginContext& context);
std::unique_ptr<class Experts> make_experts(const LoadedPlugin& plugin, Options& options, const PluginContext& context);
std::unique_ptr<class Attention> make_attention(const LoadedPlugin& plugin, Options& options, const PluginContext& context);
std::unique_ptr<class Optimizer> make_optimizer(const LoadedPlugin& plugin, Options& options, const PluginContext& context);
std::unique_ptr<class Schedule> make_schedule(const LoadedPlugin& plugin, Options& options, const PluginContext& context);

}  // namespace pithtrain
