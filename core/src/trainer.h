// The trainer: reads the run config, builds data, model, optimizer and schedule from plugins, and runs
// the training loop with LR schedule, logging, metrics and the final summary.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "data.h"
#include "model.h"
#include "pithtrain/optimizer.h"
#include "pithtrain/schedule.h"

namespace pithtrain {

struct RunSettings {
  std::vector<std::string> plugin_files;  // --plugins
  std::string out_dir;                    // --out; empty: runs/<name>-<timestamp>
  bool quiet = false;                     // tests: no progress lines
};

struct TrainConfig {
  int64_t steps = 0, batch_size = 0, micro_batches = 1, seq_len = 0, warmup_steps = 0, log_every = 10,
          eval_batches = 0;
  double lr = 0, min_lr = 0, grad_clip = 1.0, validation_fraction = 0.05;
  uint64_t seed = 0;
  std::string device, data_path, run_name;
};

struct TrainSummary {
  int64_t steps = 0;
  double first_loss = 0;           // cross-entropy of step 1
  double final_smoothed_loss = 0;  // exponential moving average (0.9) of the last steps' cross-entropy
  double validation_loss = 0;      // mean cross-entropy on held-out windows (NaN if eval_batches = 0)
  double tokens_per_second = 0;
  double seconds = 0;
  std::string run_dir;
};

// The warmup + cosine learning rate at optimizer step `step` (1-based).
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
  Options options_;
  RunSettings settings_;
  TrainConfig config_;
  std::unique_ptr<PluginRegistry> registry_;
  std::unique_ptr<TokenDataset> dataset_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<Optimizer> optimizer_;
  std::unique_ptr<Schedule> schedule_;
  std::vector<Parameter> parameters_;
  std::vector<ManifestEntry> manifest_;
  uint64_t train_end_ = 0;  // tokens [0, train_end_) train, the rest validate
};

// Writes `tensors` as a safetensors file (little-endian, CPU copies), via a temporary file and rename.
void save_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors);

}  // namespace pithtrain
