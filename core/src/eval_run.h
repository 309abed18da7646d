// `pithtrain eval`: a finished (or running) run's saved weights scored on a token file: mean loss,
// perplexity and bits per byte, on the run's own validation windows or on every window of a file.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace pithtrain {

struct EvalRequest {
  std::string run_dir;                    // --run: holds config.toml and model.safetensors or checkpoints/
  std::string data;                       // --data: a token file; empty: the run's data.path
  std::string weights;                    // --weights: empty: RUN_DIR/model.safetensors, else the newest checkpoint
  std::string split;                      // --split: "validation" or "all"; empty: validation without --data, else all
  std::vector<std::string> sets, plugins;  // --set overrides (e.g. train.device=cpu), --plugins files
};

struct EvalReport {
  std::string data, weights, split;
  int64_t step = -1;  // the step the weights were saved at (-1: the file does not say)
  double loss = 0, perplexity = 0, bits_per_byte = 0;  // bits_per_byte NaN where the token file is not byte-level
  uint64_t windows = 0, targets = 0, bytes = 0;
  int64_t seq_len = 0;
};

// Throws Error naming the run directory, weights or token file and the fix on bad input.
EvalReport evaluate_run(const EvalRequest& request);

// What `pithtrain generate` (generate.cpp) loads the same way; `command` ("eval", "generate") starts
// each error message.
// RUN_DIR/config.toml, after checking that RUN_DIR is a run directory.
std::string run_config_path(const std::string& command, const std::string& run_dir);
// A run's config.toml rewritten for one process: a multi-process run's mesh and schedule dropped.
std::string one_process_config(const std::string& config_path);
// The weights to load: `weights` when given, else RUN_DIR/model.safetensors, else the newest checkpoint.
std::string run_weights(const std::string& command, const std::string& run_dir, const std::string& weights);
// The step a safetensors file says it was saved at (its metadata "step"), -1 when it does not say.
int64_t saved_step(const std::string& file);

}  // namespace pithtrain
