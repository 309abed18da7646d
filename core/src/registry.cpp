// Plugin loading (Boost.DLL, rtld_now, local symbols) and the name -> file registry.
#include "registry.h"

#include <elf.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#define BOOST_DLL_USE_STD_FS
#include <boost/dll/shared_library.hpp>
#include <c10/util/Exception.h>

#include "pithtrain/attention.h"
#include "pithtrain/experts.h"
#include "pithtrain/optimizer.h"
#include "pithtrain/router.h"
#include "pithtrain/schedule.h"

#ifndef PITHTRAIN_PLUGIN_DIR
#define PITHTRAIN_PLUGIN_DIR ""
#endif

namespace pithtrain {
namespace fs = std::filesystem;

namespace {

// Loaded libraries are never unloaded: objects made by a plugin may outlive any registry.
std::vector<boost::dll::shared_library>& loaded_libraries() {
  static auto* libraries = new std::vector<boost::dll::shared_library>();
  return *libraries;
}

// "router_aux_free.so" -> {"router", "aux_free"}; empty kind when the name does not fit.
std::pair<std::string, std::string> split_file_name(const fs::path& file) {
  std::string stem = file.filename().string();
  if (stem.size() < 4 || stem.substr(stem.size() - 3) != ".so") return {"", ""};
  stem = stem.substr(0, stem.size() - 3);
  if (stem.rfind("lib", 0) == 0) stem = stem.substr(3);
  for (const auto& kind : kPluginKinds)
    if (stem.rfind(kind + "_", 0) == 0 && stem.size() > kind.size() + 1) return {kind, stem.substr(kind.size() + 1)};
  return {"", ""};
}

// How many bytes the ELF headers of `file` say it holds (program and section header tables, loadable
// segments), or 0 when it is not a 64-bit ELF file (dlopen then says what it is). dlopen maps a truncated
// library's segments past the end of the file, and the process dies of SIGBUS when it touches them.
uint64_t elf_extent(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  Elf64_Ehdr header{};
  if (!in.read(reinterpret_cast<char*>(&header), sizeof(header)) || std::memcmp(header.e_ident, ELFMAG, SELFMAG) != 0 ||
      header.e_ident[EI_CLASS] != ELFCLASS64)
    return 0;
  uint64_t extent = std::max<uint64_t>(sizeof(header), header.e_phoff + uint64_t{header.e_phnum} * header.e_phentsize);
  extent = std::max<uint64_t>(extent, header.e_shoff + uint64_t{header.e_shnum} * header.e_shentsize);
  for (uint16_t index = 0; index < header.e_phnum && header.e_phentsize == sizeof(Elf64_Phdr); ++index) {
    Elf64_Phdr segment{};
    in.seekg(static_cast<std::streamoff>(header.e_phoff + uint64_t{index} * sizeof(Elf64_Phdr)));
    if (!in.read(reinterpret_cast<char*>(&segment), sizeof(segment))) break;  // past the end: the table check says so
    if (segment.p_type == PT_LOAD) extent = std::max<uint64_t>(extent, segment.p_offset + segment.p_filesz);
  }
  return extent;
}

std::string kinds_text() {
  std::string text;
  for (const auto& kind : kPluginKinds) text += (text.empty() ? "" : ", ") + kind;
  return text;
}

}  // namespace

LoadedPlugin load_plugin_file(const fs::path& file) {
  const std::string where = "plugin " + file.string();
  if (!fs::exists(file)) throw Error(where + ": no such file");
  auto [file_kind, file_name] = split_file_name(file);
  if (file_kind.empty())
    throw Error(where + ": plugin files are named <kind>_<name>.so with kind one of " + kinds_text() +
                " (e.g. router_aux_free.so)");

  std::error_code size_error;
  const uint64_t size = fs::file_size(file, size_error);
  if (const uint64_t extent = elf_extent(file); !size_error && extent > size)
    throw Error(where + ": cannot be loaded as a shared library: it is truncated or damaged (its ELF headers need " +
                std::to_string(extent) + " bytes, the file has " + std::to_string(size) + "); rebuild it or copy it again");
  boost::dll::shared_library library;
  try {
    library.load(file, boost::dll::load_mode::rtld_now | boost::dll::load_mode::rtld_local);
  } catch (const std::exception& error) {
    throw Error(where + ": cannot be loaded as a shared library (" + error.what() +
                "); rebuild it as a shared library against this pithtrain (docs/plugins.md)");
  }
  if (!library.has(kPluginEntrySymbol))
    throw Error(where + ": has no entry symbol '" + kPluginEntrySymbol +
                "'; a plugin defines extern \"C\" const pithtrain::PluginDescriptor* pithtrain_plugin() "
                "(docs/plugins.md)");
  auto entry = library.get<const PluginDescriptor*()>(kPluginEntrySymbol);
  const PluginDescriptor* descriptor = entry();
  if (descriptor == nullptr) throw Error(where + ": pithtrain_plugin() returned no descriptor");
  if (descriptor->abi_version != kPluginAbiVersion)
    throw Error(where + ": plugin ABI " + std::to_string(descriptor->abi_version) + ", this pithtrain supports " +
                std::to_string(kPluginAbiVersion) + "; rebuild the plugin against this pithtrain's SDK" +
                (descriptor->abi_version < 6 && kPluginAbiVersion == 6
                     ? " (ABI 6 changed the routing contract: Routing is [tokens, slots] and a slot of weight 0 is unused, "
                       "and PluginContext gained `shared`; core/include/pithtrain/plugin.h lists every version's changes)"
                     : ""));
  std::string torch_version = descriptor->torch_version ? descriptor->torch_version : "(none)";
  if (torch_version != kTorchVersion)
    throw Error(where + ": built against LibTorch " + torch_version + ", this pithtrain uses LibTorch " +
                kTorchVersion + "; rebuild the plugin with the same LibTorch (scripts/setup.sh installs it)");
  std::string kind = descriptor->kind ? descriptor->kind : "";
  std::string name = descriptor->name ? descriptor->name : "";
  if (kind != file_kind || name != file_name)
    throw Error(where + ": its descriptor says kind '" + kind + "', name '" + name + "', but the file name says '" +
                file_kind + "', '" + file_name + "'; one name everywhere: rename the file to " + kind + "_" +
                name + ".so or fix the descriptor");
  const void* factories[] = {reinterpret_cast<const void*>(descriptor->make_router),
                             reinterpret_cast<const void*>(descriptor->make_experts),
                             reinterpret_cast<const void*>(descriptor->make_attention),
                             reinterpret_cast<const void*>(descriptor->make_optimizer),
                             reinterpret_cast<const void*>(descriptor->make_schedule)};
  for (size_t i = 0; i < kPluginKinds.size(); ++i) {
    bool is_own_kind = kPluginKinds[i] == kind;
    if (is_own_kind && factories[i] == nullptr)
      throw Error(where + ": kind '" + kind + "' but its make_" + kind + " factory is not set");
    if (!is_own_kind && factories[i] != nullptr)
      throw Error(where + ": kind '" + kind + "' but it also sets make_" + kPluginKinds[i] + "; set only make_" + kind);
  }
  loaded_libraries().push_back(library);
  return LoadedPlugin{fs::absolute(file), descriptor};
}

std::vector<fs::path> default_search_dirs(const std::vector<std::string>& config_paths) {
  std::vector<fs::path> dirs;
  // An installed pithtrain (bin/pithtrain) finds its plugins in lib/pithtrain/plugins; a build tree's
  // in its plugin folder.
  std::error_code error;
  fs::path installed = fs::read_symlink("/proc/self/exe", error).parent_path().parent_path() / "lib" / "pithtrain" / "plugins";
  if (!error && fs::is_directory(installed)) dirs.push_back(installed);
  else if (std::string(PITHTRAIN_PLUGIN_DIR).size() > 0) dirs.emplace_back(PITHTRAIN_PLUGIN_DIR);
  if (const char* env = std::getenv("PITHTRAIN_PLUGIN_PATH")) {
    std::stringstream stream(env);
    std::string dir;
    while (std::getline(stream, dir, ':'))
      if (!dir.empty()) dirs.emplace_back(dir);
  }
  for (const auto& dir : config_paths) dirs.emplace_back(dir);
  return dirs;
}

PluginRegistry::PluginRegistry(std::vector<fs::path> search_dirs, const std::vector<std::string>& explicit_files)
    : search_dirs_(std::move(search_dirs)) {
  auto add_file = [&](const fs::path& file) {
    auto [kind, name] = split_file_name(file);
    if (kind.empty()) return;
    auto& paths = files_[kind + "_" + name];
    fs::path canonical = fs::weakly_canonical(file);
    for (const auto& known : paths)
      if (known == canonical) return;
    paths.push_back(canonical);
  };
  for (const auto& dir : search_dirs_) {
    std::error_code error;
    if (!fs::is_directory(dir, error)) continue;
    std::vector<fs::path> entries;
    for (const auto& entry : fs::directory_iterator(dir, error)) entries.push_back(entry.path());
    std::sort(entries.begin(), entries.end());
    for (const auto& entry : entries) add_file(entry);
  }
  for (const auto& item : explicit_files) {
    fs::path file = item;
    if (item.find('/') == std::string::npos) {
      fs::path found;
      for (const auto& dir : search_dirs_)
        if (fs::exists(dir / item)) { found = dir / item; break; }
      if (found.empty())
        throw Error("--plugins " + item + ": no such file on the plugin search path (" + search_path_text() +
                    "); pass a path, or add its folder to PITHTRAIN_PLUGIN_PATH");
      file = found;
    } else if (!fs::exists(file)) {
      throw Error("--plugins " + item + ": no such file");
    }
    auto [kind, name] = split_file_name(file);
    if (kind.empty()) load_plugin_file(file);  // throws the naming error
    add_file(file);
    get(kind, name);
  }
}

std::string PluginRegistry::search_path_text() const {
  std::string text;
  for (const auto& dir : search_dirs_) text += (text.empty() ? "" : ":") + dir.string();
  return text.empty() ? "(empty)" : text;
}

std::vector<std::string> PluginRegistry::names_of_kind(const std::string& kind) const {
  std::vector<std::string> names;
  for (const auto& [key, paths] : files_)
    if (key.rfind(kind + "_", 0) == 0) names.push_back(key.substr(kind.size() + 1));
  return names;
}

const LoadedPlugin& PluginRegistry::get(const std::string& kind, const std::string& name) {
  std::string key = kind + "_" + name;
  auto loaded = loaded_.find(key);
  if (loaded != loaded_.end()) return loaded->second;
  auto found = files_.find(key);
  if (found == files_.end()) {
    std::string available;
    for (const auto& other : names_of_kind(kind)) available += (available.empty() ? "" : ", ") + other;
    throw Error("unknown " + kind + " plugin '" + name + "' (looked for " + key + ".so); available: " +
                (available.empty() ? "none" : available) + "; search path: " + search_path_text() +
                " (add folders with PITHTRAIN_PLUGIN_PATH, plugins.paths or --plugins)");
  }
  if (found->second.size() > 1)
    throw Error("two files provide " + kind + " plugin '" + name + "': " + found->second[0].string() + " and " +
                found->second[1].string() + "; remove one or take its folder off the search path");
  return loaded_.emplace(key, load_plugin_file(found->second[0])).first->second;
}

const LoadedPlugin& PluginRegistry::get(const std::string& kind, const std::string& name, const std::string& where) {
  try {
    return get(kind, name);
  } catch (const Error& error) {
    throw Error(where + ": " + error.what());
  }
}

std::vector<const LoadedPlugin*> PluginRegistry::load_all() {
  std::vector<const LoadedPlugin*> plugins;
  for (const auto& [key, paths] : files_) {
    auto [kind, name] = split_file_name(fs::path(key + ".so"));
    plugins.push_back(&get(kind, name));
  }
  return plugins;
}

namespace {

template <typename Component, typename Factory>
std::unique_ptr<Component> build(const LoadedPlugin& plugin, Factory factory, Options& options,
                                 const PluginContext& context) {
  std::string who = plugin.kind() + " plugin '" + plugin.name() + "' (" + plugin.file.string() + ")";
  std::unique_ptr<Component> component;
  try {
    component = factory(options, context);
  } catch (const Error& error) {
    throw Error(who + ": " + error.what());
  } catch (const c10::Error& error) {  // what() would carry LibTorch's C++ backtrace
    throw Error(who + " failed to build: " + error.what_without_backtrace());
  } catch (const std::exception& error) {
    throw Error(who + " failed to build: " + error.what());
  }
  if (!component) throw Error(who + ": its factory returned nothing");
  options.check_unknown_keys(plugin.kind() + " plugin '" + plugin.name() + "'");
  return component;
}

}  // namespace

std::unique_ptr<Router> make_router(const LoadedPlugin& plugin, Options& options, const PluginContext& context) {
  return build<Router>(plugin, plugin.descriptor->make_router, options, context);
}
std::unique_ptr<Experts> make_experts(const LoadedPlugin& plugin, Options& options, const PluginContext& context) {
  return build<Experts>(plugin, plugin.descriptor->make_experts, options, context);
}
std::unique_ptr<Attention> make_attention(const LoadedPlugin& plugin, Options& options, const PluginContext& context) {
  return build<Attention>(plugin, plugin.descriptor->make_attention, options, context);
}
std::unique_ptr<Optimizer> make_optimizer(const LoadedPlugin& plugin, Options& options, const PluginContext& context) {
  return build<Optimizer>(plugin, plugin.descriptor->make_optimizer, options, context);
}
std::unique_ptr<Schedule> make_schedule(const LoadedPlugin& plugin, Options& options, const PluginContext& context) {
  return build<Schedule>(plugin, plugin.descriptor->make_schedule, options, context);
}

}  // namespace pithtrain
