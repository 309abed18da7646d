// `pithtrain explain`: the model report (parameters, FLOPs per token, training memory estimate),
// computed by building the configured model on the meta device: exact shapes, no memory.
#pragma once
#include <string>
#include <vector>

#include "pithtrain/options.h"

namespace pithtrain {

struct ModelReport {
  int64_t total_parameters = 0;
  int64_t active_parameters = 0;     // per token: routed experts count active_experts / num_experts of theirs
  // Routed experts per token the active count uses: top_k, or for a variable-k router (remoe, top_any)
  // the mean a run measured (metrics.jsonl router[].active_experts) when one is given.
  double active_experts = 0;
  bool variable_experts = false;     // a router uses a varying number of experts per token
  bool active_experts_measured = false;
  int64_t embedding_parameters = 0;
  int64_t routed_expert_parameters = 0;
  int64_t mtp_parameters = 0;        // of the multi-token prediction depths ([model] mtp_layers), included in the total
  int64_t mtp_layers = 0;
  double forward_flops_per_token = 0;
  double training_flops_per_token = 0;
  double memory_weights_gb = 0, memory_gradients_gb = 0, memory_optimizer_gb = 0, memory_activations_gb = 0;
  double memory_total_gb = 0;
  std::vector<std::pair<std::string, int64_t>> groups;  // parameter count per component
  // With per-layer attention ([model] layer_types), which layers each attention table's plugin serves:
  // "model.linear_attention.plugin = gated_deltanet: layers 0-2; model.attention.plugin = gqa: layers 3"; else empty.
  std::string layer_types;
};

// Reads [model], [train] (batch_size, seq_len, dtype, micro_batches) and [optimizer].plugin.
// measured_active_experts > 0: a variable-k router's measured mean experts per token.
ModelReport explain_model(Options config, const std::vector<std::string>& plugin_files, double measured_active_experts = 0);
// The mean over layers of router[].active_experts in the last line of a run's metrics.jsonl that has one;
// an Error naming the file when there is none.
double measured_active_experts(const std::string& metrics_path);
std::string format_report(const ModelReport& report);

}  // namespace pithtrain
