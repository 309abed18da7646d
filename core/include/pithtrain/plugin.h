// The plugin ABI: the descriptor every plugin .so returns from its one exported C symbol, and the
// context a factory receives. Fields are only ever appended; kPluginAbiVersion goes up when they change.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <typeinfo>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <torch/headeronly/version.h>

#include "pithtrain/error.h"
#include "pithtrain/options.h"

namespace spdlog { class logger; }

namespace pithtrain {

// 2: Routing gained loss_terms and dropped_fraction, PluginContext the communicator.
// 3: Parameter gained expert_sharded, PluginContext the expert group, Communicator all_to_all/all_gather.
// 4: Communicator reduce_scatter_sum/start_send/receive; StepFunctions the unit chain and the stage;
//    Schedule shard/gather_unit/release_unit/runs_pipeline_stages; PluginContext the pipeline and context
//    groups; Attention::supports_context_parallel; the balance losses take the context group.
// 6: the routing contract for a varying number of experts per token (unused slots of weight 0; Routing
//    gained statistics, Router variable_experts_per_token and straight_through, the balance losses the weights);
//    PluginContext gained `shared`, the model-wide SharedState.
//    Attention gained supports_cache/forward_cached (the incremental-decoding path of `pithtrain
//    generate`, after supports_context_parallel in the vtable) and attention.h the AttentionCache.
inline constexpr uint32_t kPluginAbiVersion = 6;
// The LibTorch version the including code is built against; the loader refuses a plugin whose
// string differs from the core's, because tensors cross the boundary as C++ objects.
inline constexpr const char* kTorchVersion = TORCH_VERSION;

// A trainable tensor with the name it is saved under and whether weight decay applies to it.
struct Parameter {
  std::string name;
  at::Tensor tensor;
  bool weight_decay = true;
  // Expert parallel: `tensor` is this rank's block of dimension 0 of the full tensor, which is the
  // concatenation of the blocks of the expert group's ranks in rank order (equal sizes). The core
  // gathers the blocks for checkpoints, sums their gradients over the ranks holding the same block
  // and narrows a full tensor to the block on load.
  bool expert_sharded = false;
};

// State saved with the model that is not trained by the optimizer (e.g. the aux_free routing bias).
struct NamedTensor {
  std::string name;
  at::Tensor tensor;
};

// Model dimensions every plugin may need. A router or experts plugin reads the moe fields.
struct ModelDims {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t num_experts = 0;
  int64_t top_k = 0;
  int64_t expert_hidden_size = 0;  // inner width of one routed expert's SwiGLU
  int64_t seq_len = 0;  // tokens per training sequence (train.seq_len); 0 when not training
  double rope_theta = 10000.0;
  double init_std = 0.02;
};

class Communicator;  // pithtrain/distributed.h

// State that the per-layer instances of a component share model-wide: one object per key for the whole
// model (one SharedState per Model, handed to every factory in PluginContext::shared). The first get()
// of a key makes it (T default-constructed); every later get() of it returns the same object. Keys are
// the plugin's own: prefix them with its name. Under pipeline parallelism a process holds only its
// stage's layers, so the object is shared by those.
// Example, one L1 coefficient for every layer's router (plugins/router/remoe):
//   struct Controller { at::Tensor coefficient; int64_t layers = 0; };
//   controller_ = context.shared->get<Controller>("remoe.controller");
//   if (controller_->layers++ == 0) controller_->coefficient = at::full({1}, initial);
class SharedState {
 public:
  template <typename T>
  std::shared_ptr<T> get(const std::string& key) {
    auto [entry, added] = entries_.try_emplace(key);
    if (added) entry->second = {std::string(typeid(T).name()), std::make_shared<T>()};
    else if (entry->second.type != typeid(T).name())
      throw Error("shared state '" + key + "' was made with another type; two plugins use the same key (prefix it with the plugin's name)");
    return std::static_pointer_cast<T>(entry->second.object);
  }

 private:
  struct Entry {
    std::string type;
    std::shared_ptr<void> object;
  };
  std::map<std::string, Entry> entries_;
};

// What a factory gets besides its own TOML table: never the whole config.
struct PluginContext {
  ModelDims dims;
  int64_t layer_index = -1;            // the decoder layer this instance serves; -1 when none
  c10::Device device = c10::kCPU;
  c10::ScalarType dtype = c10::kFloat;  // dtype of parameters the plugin creates
  spdlog::logger* logger = nullptr;     // the core's logger (pithtrain::logger())
  std::vector<Parameter> parameters;    // optimizer plugins: the parameters to update
  std::shared_ptr<Communicator> communicator;  // the run's process group; null in a one-process run
  // The parallel.expert consecutive ranks that split each MoE layer's experts among them; null when
  // parallel.expert = 1. An experts plugin that shards experts over it marks its parameters
  // expert_sharded.
  std::shared_ptr<Communicator> expert_group;
  // The parallel.pipeline ranks that hold the stages of this rank's pipeline, in stage order (group rank
  // = stage); null when parallel.pipeline = 1. `communicator` is then this stage's data-parallel group.
  std::shared_ptr<Communicator> pipeline_group;
  // The parallel.context ranks that split every sequence (each holds two of 2 x context chunks, an early
  // and a late one); null when parallel.context = 1. `communicator` then spans data x context ranks.
  // Attention runs ring_attention (pithtrain/nn.h) over it; routers reduce per-sequence statistics.
  std::shared_ptr<Communicator> context_group;
  // Model-wide state the per-layer instances share (SharedState above); never null inside a model.
  std::shared_ptr<SharedState> shared = std::make_shared<SharedState>();
};

class Router;
class Experts;
class Attention;
class Optimizer;
class Schedule;

// The plain descriptor returned by `extern "C" const PluginDescriptor* pithtrain_plugin()`.
// Exactly one make_* factory is set: the one of `kind`. Factories may throw; the core catches.
struct PluginDescriptor {
  uint32_t abi_version;       // always first: read before anything else is trusted
  const char* kind;           // "router", "experts", "attention", "optimizer", "schedule"
  const char* name;           // equals the folder name and the file name's suffix
  const char* version;        // the plugin's own version
  const char* description;    // one line, shown by `pithtrain plugins`
  const char* torch_version;  // kTorchVersion as the plugin was compiled
  std::unique_ptr<Router> (*make_router)(Options& options, const PluginContext& context);
  std::unique_ptr<Experts> (*make_experts)(Options& options, const PluginContext& context);
  std::unique_ptr<Attention> (*make_attention)(Options& options, const PluginContext& context);
  std::unique_ptr<Optimizer> (*make_optimizer)(Options& options, const PluginContext& context);
  std::unique_ptr<Schedule> (*make_schedule)(Options& options, const PluginContext& context);
};

// The fixed entry symbol name; `grep -r pithtrain_plugin plugins/` lists every plugin.
inline constexpr const char* kPluginEntrySymbol = "pithtrain_plugin";

// The core's logger, for plugins that log (include <spdlog/spdlog.h> to use it).
spdlog::logger& logger();

}  // namespace pithtrain

// Marks a plugin's entry symbol for export (plugins are built with hidden visibility):
//   PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() { ... }
#define PITHTRAIN_PLUGIN_EXPORT extern "C" __attribute__((visibility("default")))

// The entry symbol each plugin defines (declared here so a plugin's own test, which links the plugin's
// sources statically, can call it).
PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin();
