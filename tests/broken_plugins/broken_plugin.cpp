// Deliberately broken router plugins for the loader tests; one define picks the defect.
#include "pithtrain/router.h"

namespace {
std::unique_ptr<pithtrain::Router> make_nothing(pithtrain::Options&, const pithtrain::PluginContext&) { return nullptr; }
}  // namespace

#ifdef BROKEN_NO_ENTRY
PITHTRAIN_PLUGIN_EXPORT int some_other_symbol() { return 0; }
#else
PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
#ifdef BROKEN_BAD_ABI
      .abi_version = pithtrain::kPluginAbiVersion + 1,
#else
      .abi_version = pithtrain::kPluginAbiVersion,
#endif
      .kind = "router",
#ifdef BROKEN_MISNAMED
      .name = "something_else",
#elif defined(BROKEN_BAD_ABI)
      .name = "bad_abi",
#else
      .name = "old_torch",
#endif
      .version = "0.0.1",
      .description = "broken on purpose",
#ifdef BROKEN_OLD_TORCH
      .torch_version = "1.13.1",
#else
      .torch_version = pithtrain::kTorchVersion,
#endif
      .make_router = &make_nothing,
  };
  return &descriptor;
}
#endif
