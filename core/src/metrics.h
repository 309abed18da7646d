// What a run reports: one step's figures, agreed over ranks, written to metrics.jsonl and as the
// progress line, with router diagnostics (load, dead experts, collapse) and memory.
#pragma once
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "distributed.h"
#include "mesh.h"
#include "model.h"
#include "tensorboard.h"
#include "train_config.h"

namespace pithtrain {

double resident_memory_mb();
// The most resident memory (VmHWM) since the process started or the last reset_peak_resident_memory(), in MiB.
double peak_resident_memory_mb();
// Sets VmHWM back to the current resident memory (Linux 4.0+), so the next reading is the peak of what
// ran since. False where the kernel does not allow it.
bool reset_peak_resident_memory();
// Keeps only the metrics lines of steps <= `step` (a resumed run rewrites what came after its checkpoint).
void truncate_metrics(const std::filesystem::path& path, int64_t step);

// One optimizer step's figures, collected while it runs.
struct StepFigures {
  StepResult result;
  std::vector<at::Tensor> load;                  // per MoE layer, the step's tokens_per_expert [E]
  std::map<std::string, double> loss_terms;      // router loss terms, mean over the step's micro-batches
  std::vector<double> dropped;                   // per MoE layer, dropped share (-1: dropless)
  std::vector<double> routed_tokens;             // per MoE layer, the tokens routed (load.sum() / this: active experts)
  // Routing::statistics by name: the sum and count over layers and micro-batches (this rank's).
  std::map<std::string, std::pair<double, int64_t>> statistics;
  std::map<std::string, double> grad_norms;      // gradient norm by parameter group, before clipping
  bool mtp = false;                              // the model has multi-token prediction (model.mtp_layers > 0)
  double mtp_loss = 0, mtp_cross_entropy = 0;    // its weighted loss and cross-entropy, means over the micro-batches
  double seconds = 0;
  double peak_memory_mb = 0;                     // the step's own peak resident memory
  bool peak_memory_known = false;

  // Adds a forward's routing statistics; its first MoE layer is `first_layer`.
  void record_routing(const ModelOutput& output, size_t first_layer, int64_t micro_batches);
};

// Several processes: ranks agree on the logged figures (means over the data ranks), the load (sums) and
// on stopping and on saving a checkpoint by time (any rank's `stop`, `save_due`); returns the agreed stop. Under pipeline parallelism every rank lists
// every MoE layer and router loss term (`loss_term_names`: the stages' union, agreed at the first call).
bool agree_step_figures(StepFigures& figures, bool stop, bool& save_due, const ProcessGroups& groups, const StagePlan& plan,
                        const Model& model, std::vector<std::string>& loss_term_names);

// metrics.jsonl and the progress line, with the warnings people otherwise notice only when the loss stalls.
class MetricsLog {
 public:
  // Appends to `path` when resuming (`start_step` > 0), else starts it anew. A non-empty `tensorboard_dir`
  // also writes each line's scalars there (tensorboard.h), rebuilt from the lines `path` keeps.
  MetricsLog(const std::string& path, const TrainConfig& config, double flops_per_token, int64_t start_step, bool quiet,
             const std::string& tensorboard_dir = "");
  // Every step: throughput window, the last step each expert got a token, the process's peak memory.
  void track(int64_t step, const StepFigures& figures, int64_t tokens);
  // A logged step: one metrics.jsonl line and the progress line, with validation_loss when `evaluated`.
  void write(int64_t step, const StepFigures& figures, double smoothed, double lr, bool evaluated, double validation_loss, double state_mb,
             const std::vector<std::vector<NamedTensor>>& router_buffers);
  double lifetime_peak_memory_mb();

 private:
  std::ofstream out_;
  std::string path_;
  std::unique_ptr<TensorBoardWriter> tensorboard_;
  const TrainConfig& config_;
  double flops_per_token_;
  int64_t start_step_;
  bool quiet_;
  double window_tokens_ = 0, window_seconds_ = 0, lifetime_peak_ = 0;
  std::vector<at::Tensor> last_active_;           // per MoE layer [E]: the last step the expert got a token
  std::set<size_t> warned_dead_, warned_collapse_;  // MoE layers already warned about
};

}  // namespace pithtrain
