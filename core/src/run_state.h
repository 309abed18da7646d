// The run state: what a checkpoint holds (master weights, router buffers, optimizer state, the RNG),
// how each parallel layout's pieces of it are gathered to save and narrowed to load, and resuming.
#pragma once
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "checkpoint.h"
#include "distributed.h"
#include "mesh.h"
#include "model.h"
#include "pithtrain/optimizer.h"
#include "precision.h"

namespace pithtrain {

// Where a resumed run starts: the checkpoint's step, data order position and smoothed loss.
struct ResumePoint {
  std::filesystem::path path;
  int64_t step = 0;
  uint64_t data_position = 0;
  double smoothed_loss = 0;
};

class RunState {
 public:
  // `expert_blocks`: each expert-parallel parameter's block shape (read before a schedule shards);
  // `flat_full_shapes`: the full shape of each trainable parameter a fully sharded schedule replaced by its
  // flat shard (Schedule::shard), by name. Under pipeline parallelism the tensors another stage trains
  // are emptied here (their shapes kept: checkpoints gather every stage's tensors).
  RunState(Model& model, Optimizer& optimizer, MasterWeights& weights, const std::vector<Parameter>& trainable,
           const std::map<std::string, std::vector<int64_t>>& expert_blocks,
           const std::map<std::string, std::vector<int64_t>>& flat_full_shapes, const std::set<std::string>& frozen,
           const ProcessGroups& groups, const StagePlan& plan);

  // Checkpoint entries ("model/...", "optimizer/...", "rng/cpu") as this rank holds them.
  std::vector<NamedTensor> tensors() const;
  // The full tensors of `tensors` (checkpoint entry entry_prefix + name): every stage's, expert blocks
  // gathered over the expert group, flat shards over the data ranks (a collective: every rank calls it).
  std::vector<NamedTensor> gathered(std::vector<NamedTensor> tensors, const std::string& entry_prefix = "") const;
  // Model state that is not a parameter (router buffers).
  std::vector<NamedTensor> buffers() const;
  // The model file's tensors: full master weights and router buffers (a collective).
  std::vector<NamedTensor> final_weights() const;
  std::map<std::string, std::string> metadata(int64_t step, uint64_t data_position, double smoothed,
                                              const std::string& model_toml, const std::string& data_path,
                                              const std::string& run_id) const;
  // Throws Error when checkpoint `file` (at `path`) was written for a different [model] (`model_toml`,
  // resolved) than this run's, naming `run_dir` and the ways out.
  static void check_same_model(const std::filesystem::path& path, const SafetensorsFile& file, const std::string& model_toml,
                               const std::string& run_dir);
  // Loads checkpoint `file` into the model, optimizer and RNG.
  ResumePoint resume(const std::filesystem::path& path, const SafetensorsFile& file);
  // --init-from: the weights (and router buffers where present) of a model.safetensors or checkpoint.
  void init_from(const std::string& path);
  // MiB of parameters, gradients and optimizer state this rank keeps between steps (metrics state_mb).
  double state_mb() const;
  // Model entries ("model/<name>") that are this rank's flat shard, with the full shape.
  const std::map<std::string, std::vector<int64_t>>& flat_shards() const { return flat_shards_; }

 private:
  // Copies the file's tensors (named file_prefix + name) into `targets`, narrowing full expert tensors
  // (entries entry_prefix + name) to this rank's block and full tensors to fully sharded shards.
  void load_tensors(const SafetensorsFile& file, const std::vector<NamedTensor>& targets, const std::string& entry_prefix,
                    const std::string& file_prefix, const std::string& path) const;

  Model& model_;
  Optimizer& optimizer_;
  MasterWeights& weights_;
  ProcessGroups groups_;
  const StagePlan& plan_;
  // Entries that are this rank's expert-parallel block of a larger tensor: gathered over the expert
  // group to save, narrowed to the block to load.
  std::set<std::string> sharded_entries_;
  // Entries that are this rank's fully sharded flat shard, with the full tensor's shape: gathered over
  // the data ranks to save, narrowed to the shard to load.
  std::map<std::string, std::vector<int64_t>> flat_shards_;
  // Pipeline: entries another stage keeps, emptied here, with their shapes.
  std::map<std::string, std::vector<int64_t>> away_shapes_;
};

}  // namespace pithtrain
