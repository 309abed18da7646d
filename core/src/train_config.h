// The run's settings: the [train], [eval], [checkpoint], [metrics], [data], [run] and [parallel] tables read and
// checked in one place, and the learning-rate schedule they describe.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "pithtrain/options.h"

namespace pithtrain {

struct RunSettings {
  std::vector<std::string> plugin_files;  // --plugins
  std::string out_dir;                    // --out; empty: runs/<run.name>
  std::string trace_routing;              // --trace-routing FILE; empty: off
  std::string profile;                    // --profile A-B (steps, inclusive); empty: off
  std::string init_from;                  // --init-from FILE: initial weights (model.safetensors or checkpoint)
  bool move_aside = false;                // --move-aside: a new run renames the run RUN_DIR holds to RUN_DIR.old-N
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
  int64_t checkpoint_every = 100, checkpoint_keep = 3;  // checkpoint.every: steps between saves (0: off)
  double checkpoint_every_minutes = 15;                 // checkpoint.every_minutes: wall-clock minutes between saves (0: off)
  bool resume = true;
  bool tensorboard = true;                   // metrics.tensorboard: RUN_DIR/tensorboard/ event files
  bool deterministic = false;                // train.deterministic
  std::vector<std::string> freeze;           // train.freeze: parameter-name patterns kept fixed
  int64_t dead_expert_steps = 100;           // an expert with no tokens for this many steps is dead
  double collective_timeout_seconds = 300;   // train.collective_timeout_seconds
  int64_t data_parallel = 1;                 // parallel.data: processes, each training its slice of the batch
  int64_t expert_parallel = 1;               // parallel.expert: ranks splitting each MoE layer's experts
  int64_t pipeline_parallel = 1;             // parallel.pipeline: stages the model's units are split into
  int64_t context_parallel = 1;              // parallel.context: ranks splitting every sequence
};

// Reads and checks every run setting for a job of `processes` processes (the mesh sizes must multiply
// to it). Throws Error naming the file, line, key and the allowed values.
TrainConfig read_train_config(Options& options, int64_t processes);

// The learning rate at optimizer step `step` (1-based): linear warmup, then the configured schedule.
double learning_rate(const TrainConfig& config, int64_t step);

}  // namespace pithtrain
