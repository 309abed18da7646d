// The conformance suite every plugin of a kind must pass; `pithtrain plugin check FILE.so` runs it, and
// so do the project's tests, for every plugin they find.
#pragma once
#include <string>
#include <vector>

#include "pithtrain/plugin.h"

namespace pithtrain {

struct CheckResult {
  std::string name;    // "router: double-precision gradient check"
  bool passed = false;
  std::string detail;  // numbers behind the verdict, or the error
};

// Runs the checks of the descriptor's kind at tiny sizes on the CPU, with default plugin options:
// output shapes, finite gradients, determinism under a fixed seed, a double-precision gradient check
// (central differences) and the kind's own contract (causality for attention, loss decrease for
// optimizers, gradient accumulation for schedules). Never throws: an exception is a failed check.
std::vector<CheckResult> run_conformance(const PluginDescriptor& descriptor);

}  // namespace pithtrain
