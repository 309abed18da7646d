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

}  // namespace pithtrain
