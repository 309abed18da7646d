// The process mesh: its sizes (pipeline x data x context processes, expert groups inside data x
// context) checked against the job, and the pipeline's split of the model chain into stages.
#pragma once
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "model.h"
#include "train_config.h"

namespace pithtrain {

// Reads the [parallel] sizes into `config` and checks them against the job's `processes` and the
// model's expert count (docs/distributed.md, "The mesh").
void read_mesh(Options& options, int64_t processes, TrainConfig& config);

// Which units of the model chain (0 the embedding, 1..L the decoder layers, L + 1 the head) this rank runs.
struct StagePlan {
  bool pipelined = false;  // parallel.pipeline > 1: other stages hold the other units
  // This rank's chunks [first, end) of the chain (one chunk of every unit without pipeline parallelism).
  std::vector<std::pair<int64_t, int64_t>> stage_chunks;
  // The pieces [first, end) the chain is cut into, in chain order (empty with one chunk of everything).
  std::vector<std::pair<int64_t, int64_t>> piece_units;
  std::set<std::string> owned;  // names of the parameters this rank's stage trains (pipeline only)

  bool owns_unit(int64_t unit) const;
  bool owns_moe_layer(const Model& model, int64_t moe_layer) const;  // whether this stage runs that MoE layer
  // The stage that runs piece `piece`: piece p on stage p going down, on stage 2P - 1 - p coming back up.
  int64_t owner(int64_t piece, int64_t stages) const;
};

// Cuts the chain into parallel.pipeline x chunks_per_stage pieces of consecutive units, balanced by the
// work a token does in each, or as parallel.pipeline_units says; `stage` is this rank's stage.
StagePlan plan_stages(Options& parallel, const Model& model, const std::vector<Parameter>& parameters,
                      const TrainConfig& config, int64_t chunks_per_stage, int64_t stage, bool quiet);

// A stage updates only its layers' router buffers (e.g. the aux_free bias); every rank keeps all of them
// (they are small): each stage's values reach the others (a collective over the pipeline group).
void share_stage_buffers(Communicator& pipeline_group, const StagePlan& plan, const Model& model,
                         const std::vector<NamedTensor>& buffers);

}  // namespace pithtrain
