// The model report: parameter counts from a meta-device build, FLOPs from Model::flops_per_token,
// and a training-memory estimate (weights, gradients, optimizer state, activations).
#include "explain.h"

#include <fstream>
#include <sstream>

#include <ATen/ATen.h>

#include "json.h"
#include "model.h"

namespace pithtrain {

double measured_active_experts(const std::string& metrics_path) {
  std::ifstream in(metrics_path);
  if (!in) throw Error("cannot read '" + metrics_path + "' (explain --run wants a run directory with a metrics.jsonl)");
  double found = -1;
  for (std::string line; std::getline(in, line);) {
    if (line.find("\"active_experts\"") == std::string::npos) continue;
    const JsonValue record = parse_json(line, metrics_path);
    const JsonValue* layers = record.find("router");
    if (layers == nullptr || layers->items.empty()) continue;
    double sum = 0;
    for (const auto& layer : layers->items)
      if (const JsonValue* value = layer.find("active_experts")) sum += value->number;
    found = sum / static_cast<double>(layers->items.size());
  }
  if (found < 0) throw Error("'" + metrics_path + "' has no router[].active_experts yet (a run of a MoE model logs it every train.log_every steps)");
  return found;
}

ModelReport explain_model(Options config, const std::vector<std::string>& plugin_files, double measured) {
  PluginRegistry registry(default_search_dirs(config.table("plugins").text_list("paths", {})), plugin_files);
  Options train = config.table("train");
  // The trainer's ranges for the same keys.
  const int64_t batch = train.integer("batch_size", 16, Range::at_least(1));
  const int64_t seq_len = train.integer("seq_len", 128, Range::at_least(1));
  const std::string dtype = train.text("dtype", "float32");
  const std::string optimizer = config.table("optimizer").text("plugin", "adamw");
  PluginContext context;
  context.device = c10::Device(c10::kMeta);  // shapes only: a 30B-parameter model costs no memory
  context.dtype = dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
  context.logger = &logger();
  Model model(config.table("model"), registry, context);
  config.table("model").check_unknown_keys("pithtrain explain");
  const ModelDims& dims = model.dims();

  ModelReport report;
  std::map<std::string, int64_t> groups;
  for (const auto& parameter : model.parameters()) {
    const int64_t count = parameter.tensor.numel();
    report.total_parameters += count;
    // An MTP depth's parameters (mtp_layers.<d>.x) count apart, as one group; its routed experts are routed ones.
    const bool mtp = parameter.name.rfind("mtp_layers.", 0) == 0;
    std::string group = parameter.name.rfind("layers.", 0) == 0 || mtp
                            ? parameter.name.substr(parameter.name.find('.', mtp ? 11 : 7) + 1)
                            : parameter.name;
    group = group.substr(0, group.find('.'));
    if (group == "experts") report.routed_expert_parameters += count;
    if (group == "embedding") report.embedding_parameters += count;
    if (mtp) report.mtp_parameters += count;
    groups[mtp ? "mtp_layers" : group] += count;
  }
  for (const auto& entry : groups) report.groups.emplace_back(entry.first, entry.second);
  report.mtp_layers = model.mtp_layers();
  report.variable_experts = model.variable_experts_per_token();
  report.active_experts_measured = report.variable_experts && measured > 0;
  report.active_experts = report.active_experts_measured ? measured : static_cast<double>(dims.top_k);
  for (const auto& entry : model.manifest())
    if (!entry.layers.empty())
      report.layer_types += (report.layer_types.empty() ? "" : "; ") + entry.config_key + " = " + entry.plugin->name() +
                            ": layers " + entry.layers;
  report.active_parameters = report.total_parameters - report.routed_expert_parameters +
                             static_cast<int64_t>(static_cast<double>(report.routed_expert_parameters) * report.active_experts /
                                                  static_cast<double>(std::max<int64_t>(1, dims.num_experts)));
  report.training_flops_per_token = model.flops_per_token(seq_len);
  report.forward_flops_per_token = report.training_flops_per_token / 3.0;

  // Memory per device for one process holding the whole model (no sharding yet).
  const double gb = 1024.0 * 1024.0 * 1024.0;
  const double element = dtype == "bfloat16" ? 2.0 : 4.0;
  const double parameters = static_cast<double>(report.total_parameters);
  report.memory_weights_gb = parameters * (element + (dtype == "bfloat16" ? 4.0 : 0.0)) / gb;  // + fp32 masters
  report.memory_gradients_gb = parameters * (element + (dtype == "bfloat16" ? 4.0 : 0.0)) / gb;
  report.memory_optimizer_gb = parameters * (optimizer == "lion" ? 4.0 : 8.0) / gb;  // fp32 moments
  // Activations saved for backward, per token and layer, in elements: the attention block
  // (input, q/k/v, attention output, o-projection input, norms: ~6H + 2 kv·D), and the FFN: the routed
  // (top_k) plus shared experts each keep input, gate, up and product (H + 3F), plus router scores (E).
  const double attention = 6.0 * dims.hidden_size + 2.0 * dims.num_kv_heads * dims.head_dim;
  const double ffn = (dims.top_k + 1.0) * (dims.hidden_size + 3.0 * dims.expert_hidden_size) + dims.num_experts;
  const double tokens = static_cast<double>(batch) * seq_len;
  // An MTP depth adds a layer and another float32 logits and gradient.
  report.memory_activations_gb = (tokens * static_cast<double>(dims.num_layers + report.mtp_layers) * (attention + ffn) * element +
                                  tokens * dims.vocab_size * 4.0 * 2.0 * (1.0 + report.mtp_layers)) / gb;
  report.memory_total_gb = report.memory_weights_gb + report.memory_gradients_gb + report.memory_optimizer_gb +
                           report.memory_activations_gb;
  return report;
}

std::string format_report(const ModelReport& report) {
  std::ostringstream out;
  auto billions = [](double value) {
    char buffer[32];
    std::snprintf(buffer, sizeof(buffer), value >= 1e9 ? "%.3f B" : "%.3f M", value >= 1e9 ? value / 1e9 : value / 1e6);
    return std::string(buffer);
  };
  out << "parameters: " << billions(report.total_parameters) << " total ("
      << billions(report.total_parameters - report.embedding_parameters) << " without the embedding), "
      << billions(report.active_parameters) << " active per token ("
      << billions(report.active_parameters - report.embedding_parameters) << " without the embedding)\n";
  char line[220];
  if (report.variable_experts) {
    std::snprintf(line, sizeof(line),
                  report.active_experts_measured
                      ? "  active counts the %.3g routed experts per token the run measured (a variable-k router)\n"
                      : "  active counts top_k = %.3g routed experts per token; this router's number varies per token: "
                        "pass --run RUN_DIR for the measured mean\n",
                  report.active_experts);
    out << line;
  }
  if (report.mtp_layers > 0)
    out << "  of which multi-token prediction (" << report.mtp_layers << " depth" << (report.mtp_layers > 1 ? "s" : "")
        << ", group mtp_layers; its embedding and head are the shared ones): " << billions(report.mtp_parameters) << "\n";
  for (const auto& [group, count] : report.groups) out << "  " << group << ": " << billions(count) << "\n";
  if (!report.layer_types.empty()) out << "attention by layer: " << report.layer_types << "\n";
  std::snprintf(line, sizeof(line), "FLOPs per token: %.3g forward, %.3g training (forward + backward)\n",
                report.forward_flops_per_token, report.training_flops_per_token);
  out << line;
  std::snprintf(line, sizeof(line),
                "training memory per device (estimate): %.2f GiB = weights %.2f + gradients %.2f + optimizer %.2f + "
                "activations %.2f\n",
                report.memory_total_gb, report.memory_weights_gb, report.memory_gradients_gb, report.memory_optimizer_gb,
                report.memory_activations_gb);
  out << line;
  return out.str();
}

}  // namespace pithtrain
