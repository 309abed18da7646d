// Shared by the extend tasks' hidden numeric tests: load a plugin .so the way the core does (its one
// C symbol), find parameters by name, and count failed expectations.
#pragma once
#include <dlfcn.h>

#include <cstdio>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "pithtrain/plugin.h"

namespace hidden {

inline int failures = 0;

inline void expect(bool ok, const std::string& what) {
  if (!ok) ++failures;
  std::printf("  %s  %s\n", ok ? "ok  " : "FAIL", what.c_str());
}

inline const pithtrain::PluginDescriptor* load(const char* path) {
  void* handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    std::printf("FAIL: cannot load %s: %s\n", path, dlerror());
    std::exit(1);
  }
  auto entry = reinterpret_cast<const pithtrain::PluginDescriptor* (*)()>(dlsym(handle, "pithtrain_plugin"));
  if (entry == nullptr) {
    std::printf("FAIL: %s has no pithtrain_plugin symbol\n", path);
    std::exit(1);
  }
  return entry();
}

inline at::Tensor parameter(const std::vector<pithtrain::Parameter>& parameters, const std::string& name) {
  for (const auto& parameter : parameters)
    if (parameter.name == name) return parameter.tensor;
  std::string names;
  for (const auto& parameter : parameters) names += " " + parameter.name;
  std::printf("FAIL: the plugin has no parameter named '%s' (it has:%s)\n", name.c_str(), names.c_str());
  std::exit(1);
}

inline int finish() {
  std::printf(failures == 0 ? "hidden test: all expectations met\n" : "hidden test: %d expectation(s) failed\n", failures);
  return failures == 0 ? 0 : 1;
}

}  // namespace hidden
