// Step figures, their agreement over ranks, metrics.jsonl and the progress line (metrics.h).
#include "metrics.h"

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <iomanip>
#include <sstream>

#include <ATen/ATen.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <spdlog/spdlog.h>

#include "json.h"
#include "pithtrain/error.h"

namespace pithtrain {
namespace fs = std::filesystem;

double resident_memory_mb() {
  std::ifstream statm("/proc/self/statm");
  long pages_total = 0, pages_resident = 0;
  statm >> pages_total >> pages_resident;
  return static_cast<double>(pages_resident) * static_cast<double>(::sysconf(_SC_PAGESIZE)) / (1024.0 * 1024.0);
}

double peak_resident_memory_mb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::strtod(line.c_str() + 6, nullptr) / 1024.0;  // the line says kB
  return std::nan("");
}

bool reset_peak_resident_memory() {
  std::ofstream clear_refs("/proc/self/clear_refs");
  clear_refs << "5";
  clear_refs.flush();
  return clear_refs.good();
}

// Peak bytes the device's caching allocator has handed out, in MiB (CUDA runs only).
double device_memory_peak_mb(const c10::Device& device) {
  if (!device.is_cuda()) return std::nan("");
  auto stats = c10::getDeviceAllocator(c10::DeviceType::CUDA)->getDeviceStats(device.has_index() ? device.index() : 0);
  return static_cast<double>(stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak) /
         (1024.0 * 1024.0);
}

// Keeps only the metrics lines of steps <= `step` (a resumed run rewrites what came after its checkpoint).
void truncate_metrics(const fs::path& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return;
  std::vector<std::string> kept;
  std::string line;
  while (std::getline(in, line)) {
    auto position = line.find("\"step\":");
    if (position != std::string::npos && std::strtoll(line.c_str() + position + 7, nullptr, 10) <= step) kept.push_back(line);
  }
  in.close();
  // Written aside and renamed: a kill during the rewrite leaves the old file whole.
  const fs::path temporary = path.string() + ".tmp";
  {
    std::ofstream out(temporary, std::ios::trunc);
    for (const auto& kept_line : kept) out << kept_line << "\n";
    out.flush();
    if (!out) throw Error("cannot write '" + temporary.string() + "' (disk full?); '" + path.string() + "' is unchanged");
  }
  fs::rename(temporary, path);
}

namespace {

// Per-layer router diagnostics from one step's load: the metrics.jsonl object and the figures the
// progress line and the warnings use.
struct LayerStats {
  std::string json;
  double imbalance = 0;  // max / mean load
  double entropy = 0;    // of the load over experts, divided by log(E): 1 is uniform, 0 all on one expert
  double active_experts = 0;  // used (token, slot) pairs per routed token
};

LayerStats router_stats(size_t layer, const at::Tensor& tokens_per_expert, const std::vector<NamedTensor>& buffers,
                        int64_t dead_experts, double dropped_fraction /* < 0: dropless */, double routed_tokens) {
  at::Tensor load = tokens_per_expert.to(at::kDouble);
  const double total = load.sum().item<double>(), mean = load.mean().item<double>(), max = load.max().item<double>();
  const double imbalance = mean > 0 ? max / mean : 0.0;
  at::Tensor share = load / std::max(total, 1.0);
  const double entropy = -(share * at::log(share.clamp_min(1e-30))).sum().item<double>() / std::log(load.numel());
  std::ostringstream out;
  // max_violation: (max - mean) / mean, the aux-loss-free paper's MaxVio; dead_experts: no tokens for
  // train.dead_expert_steps steps.
  out << std::setprecision(6) << "{\"moe_layer\":" << layer << ",\"max_over_mean\":" << imbalance
      << ",\"max_violation\":" << (mean > 0 ? imbalance - 1.0 : 0.0) << ",\"dead_experts\":" << dead_experts
      << ",\"busiest_fraction\":" << (total > 0 ? max / total : 0.0) << ",\"entropy\":" << entropy
      << ",\"active_experts\":" << (routed_tokens > 0 ? total / routed_tokens : 0.0)
      << ",\"tokens_per_expert\":[";
  at::Tensor counts = tokens_per_expert.to(at::kLong).contiguous();
  for (int64_t e = 0; e < counts.numel(); ++e) out << (e ? "," : "") << counts.data_ptr<int64_t>()[e];
  out << "]";
  for (const auto& buffer : buffers) {
    at::Tensor values = buffer.tensor.to(at::kDouble);
    out << "," << json_quote(buffer.name + "_norm") << ":" << values.norm().item<double>() << ","
        << json_quote(buffer.name + "_range") << ":" << (values.max() - values.min()).item<double>();
  }
  if (dropped_fraction >= 0) out << ",\"dropped_fraction\":" << dropped_fraction;
  out << "}";
  return {out.str(), imbalance, entropy, routed_tokens > 0 ? total / routed_tokens : 0.0};
}

}  // namespace

void StepFigures::record_routing(const ModelOutput& output, size_t first_layer, int64_t micro_batches) {
  const double share = 1.0 / static_cast<double>(micro_batches);
  for (size_t index = 0; index < output.tokens_per_expert.size(); ++index) {
    const size_t layer = first_layer + index;
    if (load.size() <= layer) load.resize(layer + 1);
    if (dropped.size() <= layer) dropped.resize(layer + 1, -1.0);
    if (routed_tokens.size() <= layer) routed_tokens.resize(layer + 1, 0.0);
    routed_tokens[layer] += static_cast<double>(output.routed_tokens[index]);
    const at::Tensor& layer_load = output.tokens_per_expert[index];
    load[layer] = load[layer].defined() ? load[layer] + layer_load : layer_load.clone();
    if (output.dropped_fraction[index].defined())
      dropped[layer] = std::max(dropped[layer], 0.0) + output.dropped_fraction[index].item<double>() * share;
  }
  for (const auto& [name, value] : output.router_loss_terms) loss_terms[name] += value.item<double>() * share;
  if (output.mtp_loss.defined()) {
    mtp = true;
    mtp_loss += output.mtp_loss.item<double>() * share, mtp_cross_entropy += output.mtp_cross_entropy.item<double>() * share;
  }
  for (const auto& [name, values] : output.router_statistics)
    for (const auto& value : values) statistics[name].first += value.item<double>(), statistics[name].second += 1;
}

MetricsLog::MetricsLog(const std::string& path, const TrainConfig& config, double flops_per_token, int64_t start_step, bool quiet,
                       const std::string& tensorboard_dir)
    : path_(path), config_(config), flops_per_token_(flops_per_token), start_step_(start_step), quiet_(quiet) {
  if (!tensorboard_dir.empty()) {
    std::vector<std::string> kept;  // what a resume keeps of metrics.jsonl (truncate_metrics ran already)
    std::ifstream in(start_step > 0 ? path : std::string());
    for (std::string line; std::getline(in, line);) kept.push_back(line);
    tensorboard_ = std::make_unique<TensorBoardWriter>(tensorboard_dir, kept);
  }
  out_.open(path, start_step > 0 ? std::ios::app : std::ios::trunc);
}

double MetricsLog::lifetime_peak_memory_mb() {
  lifetime_peak_ = std::max(lifetime_peak_, peak_resident_memory_mb());
  return lifetime_peak_;
}

void MetricsLog::track(int64_t step, const StepFigures& figures, int64_t tokens) {
  window_tokens_ += static_cast<double>(tokens);
  window_seconds_ += figures.seconds;
  for (size_t layer = 0; layer < figures.load.size(); ++layer) {  // the last step each expert got a token
    if (last_active_.size() <= layer) last_active_.push_back(at::full_like(figures.load[layer], start_step_, at::kLong));
    last_active_[layer] = at::where(figures.load[layer] > 0, at::full_like(last_active_[layer], step), last_active_[layer]);
  }
}

void MetricsLog::write(int64_t step, const StepFigures& figures, double smoothed, double lr, bool evaluated,
                       double validation_loss, double state_mb, const std::vector<std::vector<NamedTensor>>& router_buffers) {
  auto& log = logger();
  const double tokens_per_second = window_tokens_ / std::max(window_seconds_, 1e-9);
  const double mfu = tokens_per_second * flops_per_token_ / config_.peak_flops;
  window_tokens_ = window_seconds_ = 0;
  double imbalance = 0;
  int64_t dead_total = 0;
  double worst_dropped = -1, active_experts = 0;
  bool variable_experts = false;  // a layer's tokens used a non-whole mean number of experts
    std::string router_json = "[";
  for (size_t layer = 0; layer < figures.load.size(); ++layer) {
    if (layer > 0) router_json += ",";
    const int64_t dead = ((step - last_active_[layer]) >= config_.dead_expert_steps).sum().item<int64_t>();
    const double dropped = layer < figures.dropped.size() ? figures.dropped[layer] : -1.0;
    const double routed = layer < figures.routed_tokens.size() ? figures.routed_tokens[layer] : 0.0;
    const LayerStats stats = router_stats(layer, figures.load[layer], router_buffers[layer], dead, dropped, routed);
    active_experts += stats.active_experts / static_cast<double>(figures.load.size());
    variable_experts = variable_experts || std::abs(stats.active_experts - std::round(stats.active_experts)) > 1e-9;
    router_json += stats.json;
    imbalance = std::max(imbalance, stats.imbalance);
    worst_dropped = std::max(worst_dropped, dropped);
    dead_total += dead;
    // Warned once each: the failures people otherwise notice only when the loss stalls.
    if (dead > 0 && warned_dead_.insert(layer).second)
      log.warn("MoE layer {}: {} expert(s) received no token in the last {} steps (dead experts; metrics.jsonl "
               "router[].tokens_per_expert shows which)", layer, dead, config_.dead_expert_steps);
    if (stats.entropy < 0.5 && warned_collapse_.insert(layer).second)
      log.warn("MoE layer {}: routing collapsed onto few experts at step {} (load entropy {:.2f} of 1, max/mean {:.2f}); "
               "a balancing loss or aux_free routing counters this", layer, step, stats.entropy, stats.imbalance);
  }
  router_json += "]";
  std::ostringstream record;  // the line, for metrics.jsonl and TensorBoard alike
  record << std::setprecision(6) << "{\"step\":" << step << ",\"loss\":" << figures.result.loss
         << ",\"cross_entropy\":" << figures.result.cross_entropy << ",\"smoothed_loss\":" << smoothed
         << ",\"aux_loss\":" << figures.result.aux_loss << ",\"lr\":" << lr
         << ",\"grad_norm\":" << figures.result.grad_norm << ",\"grad_norms\":{";
  for (auto it = figures.grad_norms.begin(); it != figures.grad_norms.end(); ++it)
    record << (it == figures.grad_norms.begin() ? "" : ",") << json_quote(it->first) << ":" << it->second;
  record << "},\"tokens_per_s\":" << tokens_per_second << ",\"mfu\":" << mfu
         << ",\"memory_mb\":" << resident_memory_mb() << ",\"peak_memory_mb\":"
         << lifetime_peak_memory_mb();
  if (figures.peak_memory_known) record << ",\"step_peak_memory_mb\":" << figures.peak_memory_mb;
  record << ",\"state_mb\":" << state_mb;
  if (c10::Device(config_.device).is_cuda())
    record << ",\"device_memory_peak_mb\":" << device_memory_peak_mb(c10::Device(config_.device));
  if (evaluated) record << ",\"val_loss\":" << validation_loss;
  if (figures.mtp) record << ",\"mtp_loss\":" << figures.mtp_loss << ",\"mtp_cross_entropy\":" << figures.mtp_cross_entropy;
  if (!figures.loss_terms.empty()) {
    record << ",\"router_losses\":{";
    bool first = true;
    for (const auto& [name, value] : figures.loss_terms) record << (first ? "" : ",") << json_quote(name) << ":" << value, first = false;
    record << "}";
  }
  if (!figures.statistics.empty()) {
    record << ",\"router_statistics\":{";
    bool first = true;
    for (const auto& [name, sum_count] : figures.statistics)
      record << (first ? "" : ",") << json_quote(name) << ":" << sum_count.first / static_cast<double>(std::max<int64_t>(1, sum_count.second)), first = false;
    record << "}";
  }
  record << ",\"router\":" << router_json << "}";
  const std::string line = record.str();
  out_ << line << "\n";
  out_.flush();
  if (!out_) throw Error("writing '" + path_ + "' failed (disk full?); the run's checkpoints are unaffected");
  if (tensorboard_) tensorboard_->write(step, line);
  if (!quiet_)
    log.info("step {:>5}/{} | loss {:.4f} (smoothed {:.4f}){}{} | aux {:.4f} | lr {:.2e} | grad norm {:.3f} | "
             "{:.0f} tok/s | MFU {:.1f}% | router max/mean load {:.2f}{}{}{}",
             step, config_.steps, figures.result.cross_entropy, smoothed,
             evaluated ? fmt::format(" | val {:.4f}", validation_loss) : std::string(),
             figures.mtp ? fmt::format(" | mtp {:.4f}", figures.mtp_cross_entropy) : std::string(), figures.result.aux_loss, lr,
             figures.result.grad_norm, tokens_per_second, 100 * mfu, imbalance,
             worst_dropped >= 0 ? fmt::format(" | dropped {:.1f}%", 100 * worst_dropped) : std::string(),
             variable_experts ? fmt::format(" | active experts {:.2f}", active_experts) : std::string(),
             dead_total > 0 ? fmt::format(" | dead experts {}", dead_total) : std::string());
}

bool agree_step_figures(StepFigures& figures, bool stop, bool& save_due, const ProcessGroups& groups, const StagePlan& plan,
                        const Model& model, std::vector<std::string>& loss_term_names) {
  // Ranks agree on the logged figures (means over the data ranks), the load (sums) and on stopping
  // (any rank's signal). Under pipeline parallelism each stage contributes its own layers and its
  // part of the loss (the cross-entropy comes from the last stage), so every rank lists every MoE
  // layer and every router loss term, with zeros for what another stage has.
  if (groups.pipeline) {
    figures.load.resize(model.num_moe_layers());
    figures.dropped.resize(model.num_moe_layers(), -1.0);
    figures.routed_tokens.resize(model.num_moe_layers(), 0.0);
    for (size_t layer = 0; layer < figures.load.size(); ++layer)
      if (!figures.load[layer].defined()) figures.load[layer] = at::zeros({model.dims().num_experts}, at::kLong), figures.dropped[layer] = -1.0;
    if (loss_term_names.empty()) {
      // Once: the union of the stages' term names (a stage without MoE layers has none).
      std::string mine;
      for (const auto& [name, value] : figures.loss_terms) mine += name + ",";
      at::Tensor bytes = at::zeros({1024}, at::kByte);
      std::memcpy(bytes.data_ptr(), mine.data(), std::min<size_t>(mine.size(), 1023));
      at::Tensor all = groups.world->all_gather(bytes);
      std::set<std::string> names;
      for (int64_t rank = 0; rank < groups.world->size(); ++rank) {
        std::stringstream list(std::string(reinterpret_cast<const char*>(all.data_ptr<uint8_t>()) + rank * 1024));
        for (std::string name; std::getline(list, name, ',');) if (!name.empty()) names.insert(name);
      }
      loss_term_names.assign(names.begin(), names.end());
    }
    for (const auto& name : loss_term_names) figures.loss_terms.try_emplace(name, 0.0);
  }
  std::vector<at::Tensor> shared = {at::tensor({figures.result.loss, figures.result.cross_entropy, figures.result.aux_loss, stop ? 1.0 : 0.0,
                                            save_due ? 1.0 : 0.0}, at::kDouble)};
  for (auto& load : figures.load) shared.push_back(load);
  if (!figures.routed_tokens.empty()) shared.push_back(at::tensor(figures.routed_tokens, at::kDouble));
  for (auto& [name, value] : figures.loss_terms) shared.push_back(at::tensor({value}, at::kDouble));
  if (figures.mtp) shared.push_back(at::tensor({figures.mtp_loss, figures.mtp_cross_entropy}, at::kDouble));
  // Dropped shares travel as share + 1 (0: dropless or another stage's layer) and come back as means.
  for (auto& dropped : figures.dropped) shared.push_back(at::tensor({plan.owns_moe_layer(model, &dropped - figures.dropped.data()) ? dropped + 1.0 : 0.0}, at::kDouble));
  groups.world->all_reduce_sum(shared);
  const double n = static_cast<double>(groups.data->size());
  figures.result.loss = shared[0][0].item<double>() / n, figures.result.cross_entropy = shared[0][1].item<double>() / n;
  figures.result.aux_loss = shared[0][2].item<double>() / n, stop = shared[0][3].item<double>() > 0;
  save_due = shared[0][4].item<double>() > 0;
  size_t index = 1 + figures.load.size();
  if (!figures.routed_tokens.empty()) {
    const at::Tensor routed = shared[index++];
    for (size_t layer = 0; layer < figures.routed_tokens.size(); ++layer) figures.routed_tokens[layer] = routed[layer].item<double>();
  }
  for (auto& [name, value] : figures.loss_terms) value = shared[index++].item<double>() / n;
  if (figures.mtp) {
    const at::Tensor mtp = shared[index++];
    figures.mtp_loss = mtp[0].item<double>() / n, figures.mtp_cross_entropy = mtp[1].item<double>() / n;
  }
  for (auto& dropped : figures.dropped) dropped = shared[index++].item<double>() / n - 1.0;
  return stop;
}

}  // namespace pithtrain
