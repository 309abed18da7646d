// The trainer: builds data, model, optimizer and schedule from the config's plugins, then runs the
// training loop (trainer.cpp). Each concern has its own file: train_config (settings), mesh (processes
// and pipeline stages), precision (master weights, freezing), run_state (checkpoints and resume),
// gradients (averaging and clipping), metrics (metrics.jsonl, the progress line), evaluate (validation).
#pragma once
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "data.h"
#include "distributed.h"
#include "mesh.h"
#include "metrics.h"
#include "model.h"
#include "pithtrain/optimizer.h"
#include "pithtrain/schedule.h"
#include "precision.h"
#include "run_state.h"
#include "train_config.h"

namespace pithtrain {

struct TrainSummary {
  int64_t steps = 0;                // the last step reached
  int64_t resumed_from = 0;         // the checkpoint step this invocation started after (0: fresh)
  bool interrupted = false;         // stopped early by SIGINT/SIGTERM (after saving)
  double first_loss = 0;            // cross-entropy of step 1 (of this invocation's first step)
  double final_smoothed_loss = 0;   // exponential moving average (0.9) of the cross-entropy
  double validation_loss = 0;       // mean cross-entropy on the held-out windows (NaN if eval.batches = 0)
  double tokens_per_second = 0;
  double seconds = 0;
  std::string run_dir;
  std::vector<std::pair<int64_t, double>> losses;  // (step, cross-entropy) of every step this invocation ran
};

// What `pithtrain eval` scores (Trainer::evaluate_weights): the mean cross-entropy per target token, and
// how many windows, targets and (byte-level token files only) text bytes among the targets.
struct EvalFigures {
  double loss = 0;
  uint64_t windows = 0, targets = 0, bytes = 0;
  bool bytes_known = false;  // the token file is byte-level: every target but the end-of-document is one byte
};

class Trainer {
 public:
  // Everything that can fail on bad input fails here, before any training: config keys, plugins, data.
  Trainer(Options config, RunSettings settings);
  TrainSummary run();
  Model& model() { return *model_; }
  const TrainConfig& config() const { return config_; }
  // `pithtrain eval`: the weights of `weights` (a model.safetensors or a checkpoint) scored on the held-out
  // windows evaluate() uses (`validation_split`), or on every window of seq_len + 1 tokens at a stride of
  // seq_len over the whole token file.
  EvalFigures evaluate_weights(const std::string& weights, bool validation_split);

 private:
  double evaluate();
  // The held-out windows of evaluation batch `batch`, micro-batch `micro_batch`, that this data rank reads.
  std::vector<uint64_t> validation_offsets(uint64_t batch, uint64_t micro_batch) const;
  // The plain forward with the schedule's gather_unit/release_unit around each unit (outside run_step).
  ModelOutput forward_gathered(const at::Tensor& tokens);
  // This step's micro-batch [batch_size, seq_len + 1]: this data rank's slice of the global batch.
  at::Tensor next_micro_batch();
  // What the schedule calls to run one step over `batches`, collecting into `figures`.
  StepFunctions step_functions(const std::vector<at::Tensor>& batches, StepFigures& figures, const double& lr);

  Options options_;
  RunSettings settings_;
  TrainConfig config_;
  std::string run_dir_;
  std::unique_ptr<PluginRegistry> registry_;
  std::unique_ptr<TokenDataset> dataset_;
  std::unique_ptr<WindowOrder> train_order_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<Optimizer> optimizer_;
  std::unique_ptr<Schedule> schedule_;
  ProcessGroups groups_;        // multi-process runs (distributed.h); every member null with one process
  MasterWeights weights_;       // the model's parameters and their float32 masters
  std::set<std::string> frozen_;  // names of the train.freeze parameters
  ParameterGroups parameter_groups_;  // counted before a fully sharded schedule frees the full tensors
  StagePlan stages_;            // the units this rank runs
  std::unique_ptr<RunState> state_;
  std::vector<ManifestEntry> manifest_;
  double flops_per_token_ = 0;
  std::string base_dir_;        // RUN_DIR: rank 0's run directory, which holds the checkpoints
  std::string checkpoint_dir_;  // RUN_DIR/checkpoints, shared by all ranks
  std::string run_id_;          // the run RUN_DIR holds (run_directory.h)
  std::vector<std::string> loss_term_names_;  // pipeline: every stage's router loss terms, agreed at the first step
  uint64_t train_end_ = 0;  // tokens [0, train_end_) train, the rest validate
};

}  // namespace pithtrain
