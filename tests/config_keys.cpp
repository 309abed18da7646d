// ctest config_docs' probe (tests/test_config_docs.py reads its output): which config keys the code reads,
// with their defaults, found by building real Trainers on a minimal config, once per installed plugin.
//
// Why at run time: keys are read through Options by the core and by each plugin's factory, with defaults
// that may be computed (num_kv_heads = num_heads); only a Trainer built on a config that sets nothing
// but the required keys shows every key a layout reads and the default it takes (Options::resolved_toml,
// the same text the run saves as config.toml). One probe per plugin of each kind (found on the plugin
// search path, so a new plugin folder is probed without an edit here), one with YaRN rotary scaling per
// attention plugin (its keys are read only then), and one per required key left out (to prove it is).
// Output: one JSON object {"kind_tables", "plugins", "probes": [{name, kind, plugin, config, resolved,
// error, optional}]} written to DIR/keys.json (the log may use stdout). Args: DIR, an existing scratch
// folder the caller removes (the plugin folder is the build's, as for every test).
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "data.h"
#include "json.h"
#include "registry.h"
#include "trainer.h"

namespace fs = std::filesystem;
using namespace pithtrain;

namespace {

// The table each kind's `plugin` key (and the plugin's own keys) live in.
const std::vector<std::pair<std::string, std::string>> kKindTables = {
    {"attention", "model.attention"}, {"router", "model.moe.router"}, {"experts", "model.moe.experts"},
    {"optimizer", "optimizer"},       {"schedule", "schedule"}};

// The keys a config cannot leave out, at sizes small enough to build any plugin quickly. A dotted key
// per line, so a probe can drop one.
std::vector<std::pair<std::string, std::string>> required_keys(const std::string& tokens) {
  return {{"data.path", "\"" + tokens + "\""}, {"model.vocab_size", "257"}, {"model.hidden_size", "32"},
          {"model.num_layers", "2"},          {"model.num_heads", "2"}};
}

// A config as TOML text from dotted assignments (TOML accepts dotted keys at the root).
std::string toml_of(const std::vector<std::pair<std::string, std::string>>& assignments) {
  std::string text;
  for (const auto& [key, value] : assignments) text += key + " = " + value + "\n";
  return text;
}

struct Probe {
  std::string name, kind, plugin, config;
  bool optional = false;  // a plugin that does not read the probed switch may refuse it
};

std::string run_probe(const Probe& probe, const fs::path& scratch, int index, std::string& error) {
  Options options = Options::from_string(probe.config, "probe '" + probe.name + "'");
  try {
    RunSettings settings;
    settings.out_dir = (scratch / ("run_" + std::to_string(index))).string();
    settings.quiet = true;
    Trainer trainer(options, settings);  // Options share their state: `options` sees every read
  } catch (const std::exception& failure) {
    error = failure.what();
  }
  return options.resolved_toml();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return std::cerr << "usage: config_keys DIR (writes DIR/keys.json; DIR holds the probes' runs)\n", 2;
  const fs::path scratch = argv[1];  // the caller removes it
  std::ofstream out(scratch / "keys.json");
  // Enough byte-level text for any window a Trainer checks at construction.
  {
    std::ofstream text(scratch / "text.txt");
    for (int i = 0; i < 4000; ++i) text << "probe line " << i << ": the quick brown fox jumps over the lazy dog.\n";
  }
  const std::string tokens = (scratch / "probe.tokens").string();
  convert_text({(scratch / "text.txt").string()}, "text", tokens);
  const auto required = required_keys(tokens);

  std::vector<Probe> probes;
  probes.push_back({"defaults", "", "", toml_of(required)});
  for (const auto& [dropped, value] : required) {
    std::vector<std::pair<std::string, std::string>> rest;
    for (const auto& assignment : required)
      if (assignment.first != dropped) rest.push_back(assignment);
    probes.push_back({"without " + dropped, "", "", toml_of(rest)});
  }
  PluginRegistry registry(default_search_dirs({}), {});
  std::ostringstream plugins;
  for (const auto& [kind, table] : kKindTables)
    for (const auto& name : registry.names_of_kind(kind)) {
      const LoadedPlugin& plugin = registry.get(kind, name);
      plugins << (plugins.tellp() > 0 ? "," : "") << "\n  {\"kind\":" << json_quote(kind) << ",\"name\":" << json_quote(name)
              << ",\"file\":" << json_quote(plugin.file.string()) << "}";
      auto config = required;
      config.push_back({table + ".plugin", "\"" + name + "\""});
      probes.push_back({kind + " " + name, kind, name, toml_of(config)});
      if (kind == "attention") {  // the YaRN keys are read only with rope_scaling = "yarn"
        config.push_back({table + ".rope_scaling", "\"yarn\""});
        probes.push_back({kind + " " + name + " with yarn", kind, name, toml_of(config), /*optional=*/true});
      }
    }

  out << "{\"kind_tables\": {";
  for (size_t i = 0; i < kKindTables.size(); ++i)
    out << (i ? ", " : "") << json_quote(kKindTables[i].first) << ": " << json_quote(kKindTables[i].second);
  out << "},\n\"plugins\": [" << plugins.str() << "\n],\n\"probes\": [";
  for (size_t i = 0; i < probes.size(); ++i) {
    std::string error;
    std::cerr << "[config_keys] probe '" << probes[i].name << "'\n";
    const std::string resolved = run_probe(probes[i], scratch, static_cast<int>(i), error);
    out << (i ? "," : "") << "\n  {\"name\": " << json_quote(probes[i].name) << ", \"kind\": " << json_quote(probes[i].kind)
              << ", \"plugin\": " << json_quote(probes[i].plugin) << ", \"optional\": " << (probes[i].optional ? "true" : "false")
              << ", \"config\": " << json_quote(probes[i].config) << ", \"resolved\": " << json_quote(resolved)
              << ", \"error\": " << json_quote(error) << "}";
  }
  out << "\n]}\n";
  return 0;
}
