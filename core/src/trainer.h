// The trainer: reads the run config, builds data, model, optimizer and schedule from plugins, and runs
// the training loop: LR schedule, mixed precision, evaluation, checkpoints and resume, metrics.
#pragma once
#include <map>
#include <set>
#include <memory>
#include <string>
#include <vector>

#include "checkpoint.h"
#include "data.h"
#include "model.h"
#include "pithtrain/distributed.h"
#include "pithtrain/optimizer.h"
#include "pithtrain/schedule.h"

namespace pithtrain {

struct RunSettings {
  std::vector<std::string> plugin_files;  // --plugins
  std::string out_dir;                    // --out; empty: runs/<run.name>
  std::string trace_routing;              // --trace-routing FILE; empty: off
  std::string profile;                    // --profile A-B (steps, inclusive); empty: off
  std::string init_from;                  // --init-from FILE: initial weights (model.safetensors or checkpoint)
  bool quiet = false;                     // tests: no progress lines
};

struct TrainConfig {
  int64_t steps = 0, batch_size = 0, micro_batches = 1, seq_len = 0, warmup_steps = 0, log_every = 10;
  double lr = 0, min_lr = 0, decay_fraction = 0.2, grad_clip = 1.0, validation_fraction = 0.05, peak_flops = 0;
  std::string lr_schedule = "cosine";  // cosine | wsd | constant
  uint64_t seed = 0;
  std::string device, dtype, data_path, run_name;
  int64_t eval_every = 0, eval_batches = 0;
  int64_t loss_chunk_tokens = 0;  // > 0: the cross-entropy in chunks of this many tokens (pithtrain/kernels.h)
  int64_t checkpoint_every = 0, checkpoint_keep = 3;
  bool resume = true;
  bool deterministic = false;                // train.deterministic
  std::vector<std::string> freeze;           // train.freeze: parameter-name patterns kept fixed
  int64_t dead_expert_steps = 100;           // an expert with no tokens for this many steps is dead
  int64_t data_parallel = 1;                 // parallel.data: processes, each training its slice of the batch
  int64_t expert_parallel = 1;               // parallel.expert: ranks splitting each MoE layer's experts
  int64_t pipeline_parallel = 1;             // parallel.pipeline: stages the model's units are split into
  int64_t context_parallel = 1;              // parallel.context: ranks splitting every sequence
};

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

// The learning rate at optimizer step `step` (1-based): linear warmup, then the configured schedule.
double learning_rate(const TrainConfig& config, int64_t step);

class Trainer {
 public:
  // Everything that can fail on bad input fails here, before any training: config keys, plugins, data.
  Trainer(Options config, RunSettings settings);
  TrainSummary run();
  Model& model() { return *model_; }
  const TrainConfig& config() const { return config_; }

 private:
  double evaluate();
  // The plain forward with the schedule's gather_unit/release_unit around each unit (outside run_step).
  ModelOutput forward_gathered(const at::Tensor& tokens);
  std::vector<NamedTensor> checkpoint_tensors();
  // The full tensors of `tensors`: expert-parallel blocks (checkpoint entry entry_prefix + name) gathered
  // over the expert group (a collective: every rank calls it), the others as they are.
  std::vector<NamedTensor> gathered(std::vector<NamedTensor> tensors, const std::string& entry_prefix = "");
  // Copies the file's tensors (named file_prefix + name) into `targets`, narrowing full expert tensors
  // (entries entry_prefix + name) to this rank's block and full tensors to fully sharded shards.
  void load_tensors(const SafetensorsFile& file, const std::vector<NamedTensor>& targets, const std::string& entry_prefix,
                    const std::string& file_prefix, const std::string& path);
  // MiB of parameters, gradients and optimizer state this rank keeps between steps (metrics state_mb).
  double state_mb();
  // Pipeline parallelism: copies each stage's router buffers to the other stages (a collective over the
  // pipeline group).
  void share_stage_buffers();
  bool owns_moe_layer(int64_t moe_layer) const;  // whether this rank's stage runs that MoE layer
  bool owns_unit(int64_t unit) const;          // whether this rank runs that unit of the model chain
  std::vector<NamedTensor> buffers() const;  // model state that is not a parameter (router buffers)
  void copy_master_to_model();               // bf16 runs: the model takes the rounded float32 masters
  std::map<std::string, std::string> checkpoint_metadata(int64_t step, double smoothed) const;

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
  std::vector<Parameter> parameters_;  // the model's, in the compute dtype
  std::vector<Parameter> master_;      // float32 copies the optimizer updates (the same tensors in float32 runs)
  bool mixed_precision_ = false;
  std::vector<ManifestEntry> manifest_;
  std::set<std::string> frozen_;       // names of the train.freeze parameters
  std::shared_ptr<Communicator> world_;         // multi-process runs: every rank; null with one process
  std::shared_ptr<Communicator> communicator_;  // the data x context ranks of this stage (= world_ without pipeline)
  std::shared_ptr<Communicator> pipeline_group_;  // the stages of this rank's pipeline; null without pipeline
  std::shared_ptr<Communicator> context_group_;   // the ranks splitting this rank's sequences; null without context
  // This rank's chunks [first, end) of the model chain's units (one without pipeline parallelism).
  std::vector<std::pair<int64_t, int64_t>> stage_chunks_;
  // Pipeline: the pieces [first, end) the chain is cut into, in chain order.
  std::vector<std::pair<int64_t, int64_t>> piece_units_;
  std::set<std::string> owned_;  // pipeline: names of the parameters of this rank's stage (others are not trained here)
  // Pipeline: checkpoint entries ("model/...", "optimizer/...") another stage keeps, emptied here, with
  // their shapes.
  std::map<std::string, std::vector<int64_t>> away_shapes_;
  std::shared_ptr<Communicator> expert_group_, expert_data_group_;  // distributed.h ProcessGroups
  // Checkpoint entries ("model/...", "optimizer/...") that are this rank's expert-parallel block of a
  // larger tensor: gathered over the expert group to save, narrowed to the block to load.
  std::set<std::string> sharded_entries_;
  // Checkpoint entries that are this rank's fully sharded flat shard (Schedule::shard), with the full
  // tensor's shape: gathered over all ranks to save, narrowed to the shard to load.
  std::map<std::string, std::vector<int64_t>> flat_shards_;
  // Counted before a fully sharded schedule frees the full tensors.
  std::map<std::string, std::pair<int64_t, int64_t>> parameter_groups_;  // group -> (trainable, total) elements
  double flops_per_token_ = 0;
  std::vector<std::string> loss_term_names_;  // pipeline: every stage's router loss terms, agreed at the first step
  bool loss_terms_agreed_ = false;
  std::string checkpoint_dir_;                   // RUN_DIR/checkpoints, shared by all ranks
  uint64_t train_end_ = 0;  // tokens [0, train_end_) train, the rest validate
};

}  // namespace pithtrain
