// The training loop (DESIGN.md, "Data flow of one training step"), checkpoints and resume.
#include "trainer.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <limits>
#include <numeric>
#include <sstream>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/spdlog.h>

#include "distributed.h"
#include "json.h"
#include "pithtrain/nn.h"
#include "profiler.h"
#include "routing_trace.h"

namespace pithtrain {
namespace fs = std::filesystem;

double learning_rate(const TrainConfig& config, int64_t step) {
  if (config.warmup_steps > 0 && step <= config.warmup_steps)
    return config.lr * static_cast<double>(step) / static_cast<double>(config.warmup_steps);
  if (config.lr_schedule == "constant") return config.lr;
  if (config.lr_schedule == "wsd") {
    // Warmup-stable-decay: hold lr, then decay linearly to min_lr over the last decay_fraction of steps.
    const int64_t decay_steps = std::max<int64_t>(1, std::llround(config.decay_fraction * config.steps));
    const int64_t decay_start = config.steps - decay_steps;
    if (step <= decay_start) return config.lr;
    const double progress = std::min(1.0, static_cast<double>(step - decay_start) / decay_steps);
    return config.lr + (config.min_lr - config.lr) * progress;
  }
  const double decay_steps = std::max<int64_t>(1, config.steps - config.warmup_steps);
  const double progress = std::min(1.0, static_cast<double>(step - config.warmup_steps) / decay_steps);
  return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + std::cos(M_PI * progress));
}

namespace {

std::atomic<int> g_stop_signal{0};
void on_stop_signal(int signal) { g_stop_signal = signal; }

// Installs SIGINT/SIGTERM handlers for the life of a run: the loop finishes its step, saves, and exits.
struct StopSignals {
  struct sigaction previous_int {}, previous_term {};
  StopSignals() {
    g_stop_signal = 0;
    struct sigaction action {};
    action.sa_handler = on_stop_signal;
    sigemptyset(&action.sa_mask);
    sigaction(SIGINT, &action, &previous_int);
    sigaction(SIGTERM, &action, &previous_term);
  }
  ~StopSignals() {
    sigaction(SIGINT, &previous_int, nullptr);
    sigaction(SIGTERM, &previous_term, nullptr);
  }
};

double resident_memory_mb() {
  std::ifstream statm("/proc/self/statm");
  long pages_total = 0, pages_resident = 0;
  statm >> pages_total >> pages_resident;
  return static_cast<double>(pages_resident) * static_cast<double>(::sysconf(_SC_PAGESIZE)) / (1024.0 * 1024.0);
}

// The most resident memory this process has had since it started or since the last
// reset_peak_resident_memory() (VmHWM), in MiB.
double peak_resident_memory_mb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::strtod(line.c_str() + 6, nullptr) / 1024.0;  // the line says kB
  return std::nan("");
}

// Sets VmHWM back to the current resident memory (Linux 4.0+, "5" to /proc/self/clear_refs), so the next
// reading is the peak of what ran since. False where the kernel does not allow it.
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

// Default peak FLOP/s when train.peak_tflops is not set: H100/H200 dense bf16 for CUDA; for the CPU,
// 32 float32 FLOPs per cycle (two AVX2 FMA units) at 2.5 GHz per core.
double default_peak_flops(const std::string& device) {
  if (device.rfind("cuda", 0) == 0) return 989e12;
  return static_cast<double>(std::max<long>(1, ::sysconf(_SC_NPROCESSORS_ONLN))) * 32 * 2.5e9;
}

// `*` matches any run of characters (dots included), everything else itself.
bool glob_match(const std::string& pattern, const std::string& text) {
  size_t p = 0, t = 0, star = std::string::npos, resume = 0;
  while (t < text.size()) {
    if (p < pattern.size() && pattern[p] == '*') star = p++, resume = t;
    else if (p < pattern.size() && pattern[p] == text[t]) ++p, ++t;
    else if (star != std::string::npos) p = star + 1, t = ++resume;
    else return false;
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

// The group a parameter belongs to, for the trainable-parameter table.
std::string parameter_group(const std::string& name) {
  for (const char* group : {"router", "shared_experts", "experts", "attention", "mlp"})
    if (name.find(std::string(".") + group + ".") != std::string::npos) return group;
  if (name.find("norm") != std::string::npos) return "norms";
  return name.substr(0, name.find('.'));  // embedding, lm_head
}

// Per-layer router diagnostics from one step's load: the metrics.jsonl object and the figures the
// progress line and the warnings use.
struct LayerStats {
  std::string json;
  double imbalance = 0;  // max / mean load
  double entropy = 0;    // of the load over experts, divided by log(E): 1 is uniform, 0 all on one expert
};

LayerStats router_stats(size_t layer, const at::Tensor& tokens_per_expert, const std::vector<NamedTensor>& buffers,
                        int64_t dead_experts, double dropped_fraction /* < 0: dropless */) {
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
  return {out.str(), imbalance, entropy};
}

// Units per stage for `stages` consecutive stages of units with these costs: the split whose most
// expensive stage is cheapest (dynamic programming over prefixes).
std::vector<int64_t> balanced_split(const std::vector<double>& cost, int64_t stages) {
  const int64_t units = static_cast<int64_t>(cost.size());
  std::vector<double> prefix(units + 1, 0.0);
  for (int64_t unit = 0; unit < units; ++unit) prefix[unit + 1] = prefix[unit] + cost[unit];
  std::vector<std::vector<double>> best(stages + 1, std::vector<double>(units + 1, std::numeric_limits<double>::infinity()));
  std::vector<std::vector<int64_t>> cut(stages + 1, std::vector<int64_t>(units + 1, 0));  // where the last stage begins
  best[0][0] = 0;
  for (int64_t stage = 1; stage <= stages; ++stage)
    for (int64_t end = stage; end <= units; ++end)
      for (int64_t begin = stage - 1; begin < end; ++begin) {
        const double worst = std::max(best[stage - 1][begin], prefix[end] - prefix[begin]);
        if (worst < best[stage][end]) best[stage][end] = worst, cut[stage][end] = begin;
      }
  std::vector<int64_t> units_per_stage(stages, 0);
  for (int64_t stage = stages, end = units; stage >= 1; end = cut[stage][end], --stage) units_per_stage[stage - 1] = end - cut[stage][end];
  return units_per_stage;
}

// Units [first, end) of a chain of `units` in words: "embedding + layers 0-1", "layer 2 + head".
std::string units_named(int64_t first, int64_t end, int64_t units) {
  std::vector<std::string> parts;
  if (first == 0) parts.push_back("embedding");
  const int64_t first_layer = std::max<int64_t>(first, 1) - 1, last_layer = std::min<int64_t>(end - 1, units - 2) - 1;
  if (first_layer == last_layer) parts.push_back("layer " + std::to_string(first_layer));
  if (first_layer < last_layer) parts.push_back("layers " + std::to_string(first_layer) + "-" + std::to_string(last_layer));
  if (end == units) parts.push_back("head");
  std::string text;
  for (const auto& part : parts) text += (text.empty() ? "" : " + ") + part;
  return text;
}

// A resolved [model] table without model.moe.experts.plugin: experts plugins that share the weight
// layout (loop, grouped, ep_alltoall) are interchangeable on resume, which is how a run changes its
// expert-parallel layout; the tensor shapes are still checked one by one.
std::string without_experts_plugin(const std::string& model_toml) {
  std::istringstream in(model_toml);
  std::string line, table, result;
  while (std::getline(in, line)) {
    if (!line.empty() && line[0] == '[') table = line;
    if (table == "[model.moe.experts]" && line.rfind("plugin = ", 0) == 0) continue;
    result += line + "\n";
  }
  return result;
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
  std::ofstream out(path, std::ios::trunc);
  for (const auto& kept_line : kept) out << kept_line << "\n";
}

}  // namespace

Trainer::Trainer(Options config, RunSettings settings) : options_(std::move(config)), settings_(std::move(settings)) {
  Options train = options_.table("train");
  config_.steps = train.integer("steps", 300);
  config_.batch_size = train.integer("batch_size", 16);
  // The mesh (docs/distributed.md), checked against the process count before any process group exists.
  const auto environment = process_environment();
  const int64_t processes = environment ? environment->world_size : 1;
  Options parallel = options_.table("parallel");
  config_.pipeline_parallel = parallel.integer("pipeline", 1);
  config_.context_parallel = parallel.integer("context", 1);
  const int64_t pipeline = config_.pipeline_parallel, context_size = config_.context_parallel;
  for (auto [key, value] : {std::pair{"pipeline", pipeline}, {"context", context_size}})
    if (value < 1 || processes % value != 0)
      throw Error(parallel.where(key) + ": parallel." + key + " = " + std::to_string(value) + " must divide the job's " +
                  std::to_string(processes) + " process(es) (pithtrain launch --nproc, WORLD_SIZE or SLURM_NTASKS; processes " +
                  "= pipeline x data x context)");
  if (processes % (pipeline * context_size) != 0)
    throw Error(parallel.where("context") + ": parallel.pipeline x parallel.context = " + std::to_string(pipeline) + " x " +
                std::to_string(context_size) + " does not divide the job's " + std::to_string(processes) + " processes " +
                "(processes = pipeline x data x context)");
  config_.data_parallel = parallel.integer("data", processes / (pipeline * context_size));
  config_.expert_parallel = parallel.integer("expert", 1);
  if (config_.data_parallel * pipeline * context_size != processes)
    throw Error(parallel.where("data") + ": parallel.data = " + std::to_string(config_.data_parallel) + " but the job has " +
                std::to_string(processes) + " process(es) (pithtrain launch --nproc, WORLD_SIZE or SLURM_NTASKS) with " +
                "parallel.pipeline = " + std::to_string(pipeline) + " and parallel.context = " + std::to_string(context_size) +
                " (processes = pipeline x data x context); set parallel.data = " +
                std::to_string(processes / (pipeline * context_size)) + " or leave it out");
  const int64_t expert_ranks = config_.data_parallel * context_size;  // what expert groups subdivide
  if (config_.expert_parallel < 1 || expert_ranks % config_.expert_parallel != 0)
    throw Error(parallel.where("expert") + ": parallel.expert = " + std::to_string(config_.expert_parallel) +
                " must divide parallel.data = " + std::to_string(config_.data_parallel) +
                (context_size > 1 ? " x parallel.context = " + std::to_string(expert_ranks) : std::string()) +
                " (the experts of each MoE layer are split over groups of parallel.expert data-parallel ranks)");
  if (const int64_t experts = options_.table("model").table("moe").integer("num_experts", 8); experts % config_.expert_parallel != 0)
    throw Error(options_.table("model").table("moe").where("num_experts") + ": model.moe.num_experts = " + std::to_string(experts) +
                " is not divisible by parallel.expert = " + std::to_string(config_.expert_parallel) +
                " (each rank of an expert group holds num_experts / parallel.expert experts)");
  // train.global_batch_size fixes the sequences per optimizer step whatever the layout: micro_batches
  // follows from it unless set too.
  const int64_t global_batch_size = train.integer("global_batch_size", 0);
  const int64_t per_micro_batch = config_.batch_size * config_.data_parallel;
  int64_t derived_micro_batches = 1;
  if (global_batch_size > 0 && !train.has("micro_batches")) {
    if (global_batch_size % per_micro_batch != 0)
      throw Error(train.where("global_batch_size") + ": train.global_batch_size = " + std::to_string(global_batch_size) +
                  " is not a multiple of train.batch_size x parallel.data = " + std::to_string(config_.batch_size) + " x " +
                  std::to_string(config_.data_parallel) + " = " + std::to_string(per_micro_batch));
    derived_micro_batches = global_batch_size / per_micro_batch;
  }
  config_.micro_batches = train.integer("micro_batches", derived_micro_batches);
  if (global_batch_size > 0 && config_.micro_batches * per_micro_batch != global_batch_size)
    throw Error(train.where("micro_batches") + ": train.global_batch_size = " + std::to_string(global_batch_size) +
                " but train.batch_size x train.micro_batches x parallel.data = " + std::to_string(config_.batch_size) + " x " +
                std::to_string(config_.micro_batches) + " x " + std::to_string(config_.data_parallel) +
                "; leave train.micro_batches out to derive it");
  config_.seq_len = train.integer("seq_len", 128);
  if (config_.context_parallel > 1 && config_.seq_len % (2 * config_.context_parallel) != 0)
    throw Error(train.where("seq_len") + ": train.seq_len = " + std::to_string(config_.seq_len) + " must be a multiple of " +
                "2 x parallel.context = " + std::to_string(2 * config_.context_parallel) + " (each context rank takes two " +
                "equal chunks of every sequence)");
  config_.lr = train.number("lr", 3e-3);
  config_.min_lr = train.number("min_lr", config_.lr * 0.1);
  config_.warmup_steps = train.integer("warmup_steps", std::min<int64_t>(100, config_.steps / 10));
  config_.lr_schedule = train.text("lr_schedule", "cosine");
  config_.decay_fraction = train.number("decay_fraction", 0.2);
  config_.grad_clip = train.number("grad_clip", 1.0);
  config_.log_every = train.integer("log_every", 10);
  config_.seed = static_cast<uint64_t>(train.integer("seed", 1234));
  config_.device = train.text("device", "cpu");
  config_.dtype = train.text("dtype", "float32");
  config_.peak_flops = train.number("peak_tflops", default_peak_flops(config_.device) / 1e12) * 1e12;
  config_.deterministic = train.boolean("deterministic", false);
  config_.freeze = train.text_list("freeze", {});
  config_.dead_expert_steps = train.integer("dead_expert_steps", 100);
  config_.loss_chunk_tokens = train.integer("loss_chunk_tokens", 0);
  if (config_.loss_chunk_tokens < 0)
    throw Error(train.where("loss_chunk_tokens") + ": train.loss_chunk_tokens must be >= 0 (0: the whole micro-batch's logits at once)");
  Options eval = options_.table("eval");
  config_.eval_every = eval.integer("every", 0);
  config_.eval_batches = eval.integer("batches", 8);
  Options checkpoint = options_.table("checkpoint");
  config_.checkpoint_every = checkpoint.integer("every", 0);
  config_.checkpoint_keep = checkpoint.integer("keep", 3);
  config_.resume = checkpoint.boolean("resume", true);
  config_.run_name = options_.table("run").text("name", "tiny");
  Options data = options_.table("data");
  config_.data_path = data.required_text("path");
  config_.validation_fraction = data.number("validation_fraction", 0.05);

  for (auto [key, value] : {std::pair{"steps", config_.steps}, {"batch_size", config_.batch_size},
                            {"micro_batches", config_.micro_batches}, {"seq_len", config_.seq_len},
                            {"log_every", config_.log_every}})
    if (value < 1) throw Error(train.where(key) + ": train." + key + " must be at least 1");
  if (config_.device != "cpu" && config_.device.rfind("cuda", 0) != 0)
    throw Error(train.where("device") + ": train.device must be \"cpu\" or \"cuda[:N]\", got \"" + config_.device + "\"");
  if (config_.dtype != "float32" && config_.dtype != "bfloat16")
    throw Error(train.where("dtype") + ": train.dtype must be \"float32\" or \"bfloat16\", got \"" + config_.dtype + "\"");
  if (config_.lr_schedule != "cosine" && config_.lr_schedule != "wsd" && config_.lr_schedule != "constant")
    throw Error(train.where("lr_schedule") + ": train.lr_schedule must be \"cosine\", \"wsd\" or \"constant\", got \"" +
                config_.lr_schedule + "\"");
  if (!(config_.decay_fraction > 0 && config_.decay_fraction <= 1))
    throw Error(train.where("decay_fraction") + ": train.decay_fraction must be in (0, 1]");
  if (!(config_.validation_fraction >= 0 && config_.validation_fraction < 1))
    throw Error(data.where("validation_fraction") + ": data.validation_fraction must be in [0, 1)");
  if (config_.checkpoint_keep < 1) throw Error(checkpoint.where("keep") + ": checkpoint.keep must be at least 1");
  if (config_.dead_expert_steps < 1) throw Error(train.where("dead_expert_steps") + ": train.dead_expert_steps must be at least 1");
  if (config_.deterministic) {
    // Bit-identical reruns: LibTorch refuses (with the operator's name) any op without a deterministic
    // implementation; cuBLAS needs a fixed workspace for reproducible reductions.
    ::setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", /*overwrite=*/0);
    at::globalContext().setDeterministicAlgorithms(true, /*warn_only=*/false);
    at::globalContext().setDeterministicCuDNN(true);
    at::globalContext().setBenchmarkCuDNN(false);
  }

  Options plugins = options_.table("plugins");
  registry_ = std::make_unique<PluginRegistry>(default_search_dirs(plugins.text_list("paths", {})),
                                               settings_.plugin_files);

  // Several processes (pithtrain launch, torchrun, SLURM): data (and expert) parallel over Gloo groups.
  const double collective_timeout = train.number("collective_timeout_seconds", 300.0);
  if (environment && config_.device.rfind("cuda", 0) == 0) {
    // One GPU per process: NCCL needs distinct devices, LOCAL_RANK picks this process's.
    if (config_.device != "cuda")
      throw Error(train.where("device") + ": train.device = \"" + config_.device + "\" with " + std::to_string(processes) +
                  " processes; set train.device = \"cuda\" and each process uses cuda:LOCAL_RANK");
    if (static_cast<int64_t>(at::getNumGPUs()) <= environment->local_rank)
      throw Error(train.where("device") + ": train.device = \"cuda\" but process " + std::to_string(environment->rank) +
                  " (LOCAL_RANK " + std::to_string(environment->local_rank) + ") sees " + std::to_string(at::getNumGPUs()) +
                  " GPU(s); start at most one process per GPU, or use train.device = \"cpu\"");
    config_.device = "cuda:" + std::to_string(environment->local_rank);
  }
  if (environment) {
    ProcessGroups groups = connect(*environment, config_.device, collective_timeout, config_.expert_parallel,
                                   config_.pipeline_parallel, config_.context_parallel);
    context_group_ = groups.context;
    world_ = groups.world;
    communicator_ = groups.data;
    pipeline_group_ = groups.pipeline;
    expert_group_ = groups.expert;
    expert_data_group_ = groups.expert_data;
    if (world_->rank() > 0) settings_.quiet = true;  // rank 0 reports; the others only warn
  }
  at::manual_seed(config_.seed);
  PluginContext context;
  context.communicator = communicator_;
  context.expert_group = expert_group_;
  context.pipeline_group = pipeline_group_;
  context.context_group = context_group_;
  context.device = c10::Device(config_.device);
  context.dtype = config_.dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
  context.logger = &logger();
  // Sequence-wise router losses need the sequence boundaries: this rank's tokens of each sequence.
  context.dims.seq_len = config_.seq_len / config_.context_parallel;
  model_ = std::make_unique<Model>(options_.table("model"), *registry_, context);
  model_->set_loss_chunk_tokens(config_.loss_chunk_tokens);
  if (context_group_) {
    model_->set_context_split(context_group_->rank(), context_group_->size());
    if (!model_->attention_supports_context_parallel())
      throw Error(parallel.where("context") + ": parallel.context = " + std::to_string(config_.context_parallel) +
                  " but attention plugin '" + options_.table("model").table("attention").text("plugin", "gqa") +
                  "' does not split sequences over ranks (Attention::supports_context_parallel); use \"gqa\" or "
                  "parallel.context = 1");
  }
  manifest_ = model_->manifest();
  parameters_ = model_->parameters();
  // bf16 compute keeps float32 master weights: the optimizer updates them, the model gets bf16 copies.
  mixed_precision_ = context.dtype != at::kFloat;
  for (const auto& parameter : parameters_) {
    master_.push_back(parameter);
    if (mixed_precision_) master_.back().tensor = parameter.tensor.detach().to(at::kFloat).clone();
  }
  std::map<std::string, at::IntArrayRef> sharded_shapes;  // parameter name -> its block's shape
  for (const auto& parameter : parameters_)
    if (parameter.expert_sharded) {
      sharded_entries_.insert("model/" + parameter.name);
      sharded_shapes.emplace(parameter.name, parameter.tensor.sizes());
    }
  if (config_.expert_parallel > 1 && model_->num_moe_layers() > 0 && sharded_entries_.empty())
    throw Error(options_.table("parallel").where("expert") + ": parallel.expert = " + std::to_string(config_.expert_parallel) +
                " but the experts plugin '" + options_.table("model").table("moe").table("experts").text("plugin", "grouped") +
                "' keeps every expert on every rank; set model.moe.experts.plugin = \"ep_alltoall\"");

  // train.freeze: parameters whose names match a pattern keep their values (fine-tuning).
  std::vector<Parameter> trainable;
  std::vector<std::string> unmatched = config_.freeze;
  for (size_t i = 0; i < parameters_.size(); ++i) {
    bool frozen = false;
    for (const auto& pattern : config_.freeze)
      if (glob_match(pattern, parameters_[i].name)) {
        frozen = true;
        std::erase(unmatched, pattern);
      }
    if (frozen) {
      parameters_[i].tensor.requires_grad_(false);
      frozen_.insert(parameters_[i].name);
    } else {
      trainable.push_back(master_[i]);
    }
  }
  if (!unmatched.empty())
    throw Error(train.where("freeze") + ": train.freeze pattern '" + unmatched.front() +
                "' matches no parameter (names look like layers.1.router.gate.weight; * matches anything)");
  if (trainable.empty()) throw Error(train.where("freeze") + ": train.freeze leaves no parameter to train");

  flops_per_token_ = model_->flops_per_token(config_.seq_len);
  Options optimizer_options = options_.table("optimizer");
  const LoadedPlugin& optimizer_plugin = registry_->get("optimizer", optimizer_options.text("plugin", "adamw"));
  PluginContext optimizer_context = context;
  optimizer_context.dtype = at::kFloat;
  optimizer_context.dims = model_->dims();
  optimizer_context.parameters = trainable;
  Options schedule_options = options_.table("schedule");
  const LoadedPlugin& schedule_plugin = registry_->get("schedule", schedule_options.text("plugin", "single"));
  schedule_ = make_schedule(schedule_plugin, schedule_options, optimizer_context);
  if (config_.pipeline_parallel > 1 && !schedule_->runs_pipeline_stages())
    throw Error(schedule_options.where("plugin") + ": parallel.pipeline = " + std::to_string(config_.pipeline_parallel) +
                " but schedule '" + schedule_plugin.name() + "' runs the whole model on every rank; set schedule.plugin = "
                "\"pipeline_1f1b\" (or \"dualpipev\")");
  if (config_.pipeline_parallel > 1 && config_.micro_batches > 1 && model_->needs_step_counts())
    throw Error(options_.table("model").table("moe").table("router").where("global_aux_loss_coeff") +
                ": the global-batch balance loss over several micro-batches needs every layer's routing before the step, "
                "which a pipeline stage does not have; under parallel.pipeline use aux_loss_coeff or seq_aux_loss_coeff, "
                "or the aux_free router");
  // Pipeline stages: the model chain cut into parallel.pipeline x chunks_per_stage pieces of
  // consecutive units, balanced by the work a token does in each (matrix parameters it multiplies
  // with, experts at top_k / num_experts, plus attention scores), or as parallel.pipeline_units says.
  stage_chunks_ = {{0, model_->num_units()}};
  if (config_.pipeline_parallel > 1 || schedule_->chunks_per_stage() > 1) {
    const int64_t units = model_->num_units(), stages = config_.pipeline_parallel;
    const int64_t chunks = schedule_->chunks_per_stage(), pieces = stages * chunks;
    const std::string pieces_text = chunks == 1 ? std::to_string(stages) + " stages"
                                                : std::to_string(pieces) + " chunks (" + std::to_string(chunks) + " per stage)";
    const ModelDims& dims = model_->dims();
    std::vector<int64_t> units_per_piece;
    if (parallel.has("pipeline_units")) {
      std::stringstream list(parallel.text("pipeline_units", ""));
      std::string item;
      while (std::getline(list, item, ',')) units_per_piece.push_back(std::atoll(item.c_str()));
      const bool positive = std::all_of(units_per_piece.begin(), units_per_piece.end(), [](int64_t count) { return count > 0; });
      if (!positive || static_cast<int64_t>(units_per_piece.size()) != pieces ||
          std::accumulate(units_per_piece.begin(), units_per_piece.end(), int64_t{0}) != units)
        throw Error(parallel.where("pipeline_units") + ": parallel.pipeline_units = \"" + parallel.text("pipeline_units", "") +
                    "\" must list " + std::to_string(pieces) + " positive counts (" + pieces_text + ") adding up to the " +
                    std::to_string(units) + " units (the embedding, " + std::to_string(dims.num_layers) + " decoder layers, the head)");
    } else {
      if (units < pieces)
        throw Error(parallel.where("pipeline") + ": parallel.pipeline = " + std::to_string(stages) + " needs " + pieces_text +
                    " but the model has only " + std::to_string(units) + " units (the embedding, each decoder layer, the head)");
      std::vector<double> cost(units, 0.0);
      for (const auto& parameter : parameters_) {
        if (parameter.tensor.dim() < 2 || parameter.name == "embedding.weight") continue;
        // An expert-parallel block stands for parallel.expert blocks: the split does not depend on the layout.
        const double count = static_cast<double>(parameter.tensor.numel() * (parameter.expert_sharded ? config_.expert_parallel : 1));
        cost[model_->unit_of(parameter.name)] +=
            parameter.name.find(".experts.") != std::string::npos ? count * dims.top_k / dims.num_experts : count;
      }
      for (int64_t unit = 1; unit + 1 < units; ++unit) cost[unit] += static_cast<double>(config_.seq_len * dims.num_heads * dims.head_dim);
      units_per_piece = balanced_split(cost, pieces);
    }
    for (int64_t index = 0, first = 0; index < pieces; first += units_per_piece[index], ++index)
      piece_units_.emplace_back(first, first + units_per_piece[index]);
    const int64_t stage = pipeline_group_ ? pipeline_group_->rank() : 0;
    const int64_t stage_ranks = config_.data_parallel * config_.context_parallel;
    std::string plan;
    stage_chunks_.clear();
    for (int64_t index = 0; index < stages; ++index) {
      std::string named;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const auto [first, end] = piece_units_[chunk == 0 ? index : pieces - 1 - index];
        if (index == stage) stage_chunks_.emplace_back(first, end);
        named += (chunk ? " | " : "") + units_named(first, end, units);
      }
      plan += fmt::format("{}stage {} (ranks {}-{}): {}", index ? "; " : "", index, index * stage_ranks, (index + 1) * stage_ranks - 1, named);
    }
    if (!settings_.quiet) logger().info("pipeline: {}", plan);
    for (const auto& parameter : parameters_)
      if (owns_unit(model_->unit_of(parameter.name))) owned_.insert(parameter.name);
  }
  for (const auto& parameter : parameters_) {
    auto& [trainable_count, total] = parameter_groups_[parameter_group(parameter.name)];
    total += parameter.tensor.numel();
    if (!frozen_.count(parameter.name)) trainable_count += parameter.tensor.numel();
  }

  // A fully sharded schedule hands back one flat shard per trainable parameter: the optimizer and the
  // checkpoints see those, the schedule owns the full tensors.
  std::vector<std::vector<Parameter>> trainable_by_unit(model_->num_units());
  for (const auto& parameter : trainable) trainable_by_unit[model_->unit_of(parameter.name)].push_back(parameter);
  std::map<std::string, at::IntArrayRef> shard_shapes;  // parameter name -> its shard's shape
  std::map<std::string, std::vector<int64_t>> full_shapes;  // read before a schedule frees the full tensors
  for (const auto& parameter : trainable) full_shapes[parameter.name] = parameter.tensor.sizes().vec();
  if (std::vector<Parameter> shards = schedule_->shard(trainable_by_unit); !shards.empty()) {
    std::map<std::string, Parameter> by_name;
    for (auto& shard : shards) by_name[shard.name] = shard;
    for (auto& parameter : trainable) {
      auto found = by_name.find(parameter.name);
      if (found == by_name.end())
        throw Error("schedule '" + schedule_plugin.name() + "' returned no shard for parameter '" + parameter.name + "'");
      for (auto& master : master_)
        if (master.name == parameter.name) master.tensor = found->second.tensor;
      flat_shards_["model/" + parameter.name] = full_shapes.at(parameter.name);
      parameter.tensor = found->second.tensor;
    }
    for (auto& parameter : trainable) shard_shapes.emplace(parameter.name, parameter.tensor.sizes());
    optimizer_context.parameters = trainable;
  }
  optimizer_ = make_optimizer(optimizer_plugin, optimizer_options, optimizer_context);
  manifest_.push_back({"optimizer.plugin", &optimizer_plugin});
  // Optimizer state of an expert block or a flat shard (named "<parameter>.<what>", the block's or the
  // shard's shape) is a block or a shard too.
  for (const auto& item : optimizer_->state()) {
    for (const auto& [name, shape] : sharded_shapes)
      if (item.name.rfind(name + ".", 0) == 0 && item.tensor.sizes() == shape) sharded_entries_.insert("optimizer/" + item.name);
    for (const auto& [name, shape] : shard_shapes)
      if (item.name.rfind(name + ".", 0) == 0 && item.tensor.sizes() == shape)
        flat_shards_["optimizer/" + item.name] = flat_shards_.at("model/" + name);
  }
  manifest_.push_back({"schedule.plugin", &schedule_plugin});
  if (pipeline_group_) {
    // A stage keeps only its units' trainable parameters and their optimizer state; the others are
    // emptied (their shapes kept for checkpoints, which gather every stage's tensors).
    at::NoGradGuard no_grad;
    auto away = [&](const std::string& entry, const at::Tensor& tensor) {
      away_shapes_[entry] = tensor.sizes().vec();
      tensor.set_data(at::empty({0}, tensor.options()));
    };
    // Optimizer state of a parameter is named "<parameter>.<what>" (as for expert blocks above).
    for (const auto& item : optimizer_->state())
      for (const auto& parameter : trainable)
        if (!owned_.count(parameter.name) && item.name.rfind(parameter.name + ".", 0) == 0) {
          away("optimizer/" + item.name, item.tensor);
          break;
        }
    for (size_t index = 0; index < parameters_.size(); ++index)
      if (!owned_.count(parameters_[index].name) && !frozen_.count(parameters_[index].name)) {
        away("model/" + master_[index].name, master_[index].tensor);
        if (mixed_precision_) parameters_[index].tensor.set_data(at::empty({0}, parameters_[index].tensor.options()));
      }
  }

  options_.check_unknown_keys();

  dataset_ = std::make_unique<TokenDataset>(config_.data_path);
  if (static_cast<int64_t>(dataset_->header().vocab_size) > model_->dims().vocab_size)
    throw Error(options_.table("model").where("vocab_size") + ": model.vocab_size is " +
                std::to_string(model_->dims().vocab_size) + " but dataset '" + config_.data_path + "' has tokens up to " +
                std::to_string(dataset_->header().vocab_size) + "; raise model.vocab_size");
  train_end_ = static_cast<uint64_t>(std::llround(dataset_->size() * (1.0 - config_.validation_fraction)));
  train_order_ = std::make_unique<WindowOrder>(0, train_end_, config_.seq_len + 1, config_.seed);
  run_dir_ = settings_.out_dir.empty() ? "runs/" + config_.run_name : settings_.out_dir;
  checkpoint_dir_ = (fs::path(run_dir_) / "checkpoints").string();
  // Other ranks keep their own config, log and metrics below the run directory; checkpoints and the
  // final weights are rank 0's (all ranks hold the same state).
  if (world_ && world_->rank() > 0) run_dir_ += "/rank_" + std::to_string(world_->rank());
}

double Trainer::evaluate() {
  const uint64_t held_out = dataset_->size() - train_end_;
  const uint64_t seq_len = static_cast<uint64_t>(config_.seq_len);
  if (config_.eval_batches < 1 || held_out < seq_len + 1) return std::nan("");
  at::NoGradGuard no_grad;
  // The same held-out windows, evenly spread, every time: validation losses compare across a run. A
  // batch is a global batch (batch_size x micro_batches x ranks windows) split as in training, so every
  // layout evaluates the same windows; the mean over equal pieces is the mean over all of them.
  const uint64_t per_rank = static_cast<uint64_t>(config_.batch_size), micro_batches = static_cast<uint64_t>(config_.micro_batches);
  const uint64_t ranks = static_cast<uint64_t>(config_.data_parallel);  // context ranks share the windows
  const uint64_t rank = communicator_ ? static_cast<uint64_t>(communicator_->rank() / config_.context_parallel) : 0;
  const uint64_t global = per_rank * micro_batches * ranks;
  const uint64_t available = (held_out - 1) / seq_len;
  const uint64_t wanted = static_cast<uint64_t>(config_.eval_batches) * global;
  double total = 0;
  for (uint64_t batch = 0; batch < static_cast<uint64_t>(config_.eval_batches); ++batch)
    for (uint64_t micro_batch = 0; micro_batch < micro_batches; ++micro_batch) {
      std::vector<uint64_t> offsets;
      for (uint64_t row = 0; row < per_rank; ++row) {
        const uint64_t window = batch * global + (micro_batch * ranks + rank) * per_rank + row;
        offsets.push_back(train_end_ + (window * available / wanted) % available * seq_len);
      }
      at::Tensor tokens = dataset_->windows(offsets, config_.seq_len + 1);
      if (!pipeline_group_) {
        total += forward_gathered(tokens).cross_entropy.item<double>();
        continue;
      }
      // Pipeline: the chain's pieces in order, each on its stage, the activation passed from stage to
      // stage; the last piece's stage has the loss.
      const int64_t stage = pipeline_group_->rank();
      const int64_t tag = 1000000 + static_cast<int64_t>(batch * micro_batches + micro_batch);
      const std::vector<int64_t> shape = {config_.batch_size, config_.seq_len / config_.context_parallel, model_->dims().hidden_size};
      const int64_t pieces = static_cast<int64_t>(piece_units_.size()), stages = pipeline_group_->size();
      // Piece p runs on stage p going down and on stage 2P - 1 - p coming back up (one piece per stage: p).
      auto owner = [&](int64_t piece) { return piece < stages ? piece : pieces - 1 - piece; };
      at::Tensor x;
      ModelOutput scratch;
      for (int64_t piece = 0; piece < pieces; ++piece) {
        if (owner(piece) != stage) continue;
        if (piece > 0 && owner(piece - 1) != stage)
          x = pipeline_group_->receive(shape, config_.dtype == "bfloat16" ? at::kBFloat16 : at::kFloat, owner(piece - 1), tag);
        for (int64_t unit = piece_units_[piece].first; unit < piece_units_[piece].second; ++unit)
          x = model_->forward_unit(unit, x, tokens, scratch).output;
        if (piece + 1 == pieces) total += x.item<double>();
        else if (owner(piece + 1) != stage) pipeline_group_->start_send(x.contiguous(), owner(piece + 1), tag)->wait();
      }
    }
  total /= static_cast<double>(config_.eval_batches * micro_batches);
  if (pipeline_group_) {  // the loss is the last piece's stage's
    std::vector<at::Tensor> sum = {at::tensor({total}, at::kDouble)};
    pipeline_group_->all_reduce_sum(sum);
    total = sum[0].item<double>();
  }
  if (communicator_) {
    std::vector<at::Tensor> sum = {at::tensor({total}, at::kDouble)};
    communicator_->all_reduce_sum(sum);
    total = sum[0].item<double>() / static_cast<double>(communicator_->size());
  }
  return total;
}

ModelOutput Trainer::forward_gathered(const at::Tensor& tokens) {
  return model_->forward(tokens, [this](int64_t unit) { schedule_->gather_unit(unit); },
                         [this](int64_t unit) { schedule_->release_unit(unit); });
}

std::vector<NamedTensor> Trainer::gathered(std::vector<NamedTensor> tensors, const std::string& entry_prefix) {
  if (pipeline_group_) {
    // Trainable parameters and their optimizer state live on the stage that trains them: every stage's
    // come together as a sum over the stages, with zeros for the ones kept elsewhere.
    std::vector<at::Tensor> shared;
    for (auto& item : tensors) {
      const std::string entry = entry_prefix + item.name;
      bool stage_tensor = away_shapes_.count(entry) > 0;
      if (auto shape = away_shapes_.find(entry); shape != away_shapes_.end())
        item.tensor = at::zeros(shape->second, item.tensor.options());
      else
        for (const auto& parameter : master_)
          if (owned_.count(parameter.name) && (entry == "model/" + parameter.name || entry.rfind("optimizer/" + parameter.name + ".", 0) == 0)) {
            stage_tensor = true;
            break;
          }
      if (!stage_tensor) continue;
      item.tensor = item.tensor.detach().clone();
      shared.push_back(item.tensor);
    }
    pipeline_group_->all_reduce_sum(shared);
  }
  for (auto& item : tensors) {
    if (expert_group_ && sharded_entries_.count(entry_prefix + item.name))
      item.tensor = expert_group_->all_gather(item.tensor.detach());
    if (auto shard = flat_shards_.find(entry_prefix + item.name); shard != flat_shards_.end()) {
      at::Tensor flat = communicator_ ? communicator_->all_gather(item.tensor.detach()) : item.tensor.detach();
      item.tensor = flat.narrow(0, 0, c10::multiply_integers(shard->second)).view(shard->second);
    }
  }
  return tensors;
}

void Trainer::load_tensors(const SafetensorsFile& file, const std::vector<NamedTensor>& targets, const std::string& entry_prefix,
                           const std::string& file_prefix, const std::string& path) {
  std::set<std::string> blocks;
  for (const auto& entry : sharded_entries_)
    if (entry.rfind(entry_prefix, 0) == 0) blocks.insert(entry.substr(entry_prefix.size()));
  std::map<std::string, std::vector<int64_t>> shards;
  for (const auto& [entry, shape] : flat_shards_)
    if (entry.rfind(entry_prefix, 0) == 0) shards.emplace(entry.substr(entry_prefix.size()), shape);
  std::vector<NamedTensor> here;  // pipeline: the tensors this stage keeps
  for (const auto& target : targets)
    if (!away_shapes_.count(entry_prefix + target.name)) here.push_back(target);
  copy_tensors_by_name(file, here, file_prefix, path, blocks, expert_group_ ? expert_group_->rank() : 0,
                       expert_group_ ? expert_group_->size() : 1, shards, communicator_ ? communicator_->rank() : 0,
                       communicator_ ? communicator_->size() : 1);
}

std::vector<NamedTensor> Trainer::checkpoint_tensors() {
  std::vector<NamedTensor> tensors;
  for (const auto& parameter : master_) tensors.push_back({"model/" + parameter.name, parameter.tensor});
  for (const auto& item : buffers()) tensors.push_back({"model/" + item.name, item.tensor});
  for (const auto& item : optimizer_->state()) tensors.push_back({"optimizer/" + item.name, item.tensor});
  tensors.push_back({"rng/cpu", at::detail::getDefaultCPUGenerator().get_state()});
  return tensors;
}

bool Trainer::owns_moe_layer(int64_t moe_layer) const {
  if (!pipeline_group_) return true;
  for (const auto& [first, end] : stage_chunks_)
    for (int64_t unit = first; unit < end; ++unit)
      if (model_->moe_layer_of_unit(unit) == moe_layer) return true;
  return false;
}

bool Trainer::owns_unit(int64_t unit) const {
  for (const auto& [first, end] : stage_chunks_)
    if (unit >= first && unit < end) return true;
  return false;
}

void Trainer::share_stage_buffers() {
  // A stage updates only its layers' router buffers (e.g. the aux_free bias); every rank keeps all of
  // them (they are small): each stage's values reach the others as a sum of (own ? value : 0).
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> values, targets;
  auto add = [&](const std::string& name, const at::Tensor& tensor) {
    const int64_t unit = model_->unit_of(name);
    const bool own = owns_unit(unit);
    values.push_back(own ? tensor : at::zeros_like(tensor));
    targets.push_back(own ? at::Tensor() : tensor);
  };
  for (const auto& item : buffers()) add(item.name, item.tensor);
  pipeline_group_->all_reduce_sum(values);
  for (size_t index = 0; index < values.size(); ++index)
    if (targets[index].defined()) targets[index].copy_(values[index]);
}

double Trainer::state_mb() {
  // Tensors that stay between steps: what a sharded schedule divides. Gradients are counted where
  // they are kept (the master copies'; a bf16 model's own are transient).
  double bytes = 0;
  for (const auto& parameter : master_) {
    bytes += static_cast<double>(parameter.tensor.nbytes());
    if (parameter.tensor.grad().defined()) bytes += static_cast<double>(parameter.tensor.grad().nbytes());
  }
  if (mixed_precision_)
    for (const auto& parameter : parameters_) bytes += static_cast<double>(parameter.tensor.nbytes());
  for (const auto& item : optimizer_->state()) bytes += static_cast<double>(item.tensor.nbytes());
  return bytes / (1024.0 * 1024.0);
}

std::vector<NamedTensor> Trainer::buffers() const {
  std::vector<NamedTensor> result;
  for (const auto& item : model_->state())
    if (std::none_of(master_.begin(), master_.end(), [&](const Parameter& p) { return p.name == item.name; }))
      result.push_back(item);
  return result;
}

void Trainer::copy_master_to_model() {
  if (!mixed_precision_) return;  // float32: the master weights are the model's own tensors
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < parameters_.size(); ++i) parameters_[i].tensor.copy_(master_[i].tensor);
}

std::map<std::string, std::string> Trainer::checkpoint_metadata(int64_t step, double smoothed) const {
  char smoothed_text[32];
  std::snprintf(smoothed_text, sizeof(smoothed_text), "%.17g", smoothed);
  return {{"step", std::to_string(step)},
          {"data_position", std::to_string(train_order_->position())},
          {"smoothed_loss", smoothed_text},
          {"model_config", options_.table("model").resolved_toml()},
          {"data_path", config_.data_path}};
}

TrainSummary Trainer::run() {
  auto& log = logger();
  TrainSummary summary;
  summary.run_dir = run_dir_;
  fs::create_directories(run_dir_);
  const std::string resolved = options_.resolved_toml();
  std::ofstream(run_dir_ + "/config.toml") << resolved << "\n";
  // The log also goes to RUN_DIR/train.log (appended to by each resume) while this run lasts.
  auto log_file = std::make_shared<spdlog::sinks::basic_file_sink_mt>(run_dir_ + "/train.log");
  log_file->set_pattern("[%Y-%m-%d %H:%M:%S %l] %v");
  log.sinks().push_back(log_file);
  struct DetachSink {
    spdlog::logger& log;
    spdlog::sink_ptr sink;
    ~DetachSink() { std::erase(log.sinks(), sink); }
  } detach_log_file{log, log_file};
  if (!settings_.quiet) {
    log.info("components:");
    for (const auto& entry : manifest_)
      log.info("  {:<26} = {:<13} v{:<6} {}", entry.config_key, entry.plugin->name(), entry.plugin->descriptor->version,
               entry.plugin->file.string());
    log.info("resolved config (saved to {}/config.toml):\n{}", run_dir_, resolved);
    int64_t count = 0;
    for (const auto& [group, counts] : parameter_groups_) count += counts.second;
    log.info("model: {} parameters, {} MoE layers of {}, {:.3g} training FLOPs per token; data: {} tokens ({} train, {} windows "
             "per epoch) from {}",
             count, model_->num_moe_layers(), model_->dims().num_layers, flops_per_token_,
             dataset_->size(), train_end_, train_order_->count(), config_.data_path);
    std::string table;
    for (const auto& [group, counts] : parameter_groups_)
      table += fmt::format("{}{} {}/{}", table.empty() ? "" : ", ", group, counts.first, counts.second);
    log.info("trainable parameters by group (trainable/total): {}{}", table,
             frozen_.empty() ? "" : fmt::format("; {} tensors frozen by train.freeze", frozen_.size()));
  }

  // Resume from the newest valid checkpoint of this run directory.
  CheckpointFolder checkpoints(checkpoint_dir_, config_.checkpoint_keep);
  const bool writes_checkpoints = !world_ || world_->rank() == 0;
  // The data-parallel index and count: the ranks of a context group read the same sequences.
  const int64_t ranks = config_.data_parallel, rank = communicator_ ? communicator_->rank() / config_.context_parallel : 0;
  double smoothed = 0;
  int64_t start_step = 0;
  if (config_.resume) {
    if (auto latest = checkpoints.load_latest()) {
      const auto& [path, file] = *latest;
      // Resuming another model's checkpoint would train the wrong thing; say so instead.
      auto saved = file.metadata.find("model_config");
      const std::string current = without_experts_plugin(options_.table("model").resolved_toml());
      if (saved != file.metadata.end() && without_experts_plugin(saved->second) != current) {
        std::istringstream before(without_experts_plugin(saved->second)), now(current);
        std::string line_before, line_now;
        while (std::getline(before, line_before) && std::getline(now, line_now) && line_before == line_now) {}
        throw Error("checkpoint '" + path.string() + "' was written for a different [model] config (it has '" + line_before +
                    "', this run '" + line_now + "'); use a new --out (or run.name) for this config, or set "
                    "checkpoint.resume = false to start over in " + run_dir_);
      }
      std::vector<NamedTensor> targets = checkpoint_tensors();
      std::vector<NamedTensor> model_targets, optimizer_targets;
      for (auto& target : targets) {
        if (target.name.rfind("model/", 0) == 0) model_targets.push_back({target.name.substr(6), target.tensor});
        if (target.name.rfind("optimizer/", 0) == 0) optimizer_targets.push_back({target.name.substr(10), target.tensor});
      }
      load_tensors(file, model_targets, "model/", "model/", path.string());
      load_tensors(file, optimizer_targets, "optimizer/", "optimizer/", path.string());
      if (const at::Tensor* rng = file.find("rng/cpu")) {
        at::Generator generator = at::detail::getDefaultCPUGenerator();
        generator.set_state(*rng);
      }
      start_step = std::stoll(file.metadata.at("step"));
      train_order_->set_position(std::stoull(file.metadata.at("data_position")));
      smoothed = std::stod(file.metadata.at("smoothed_loss"));
      copy_master_to_model();
      summary.resumed_from = start_step;
      truncate_metrics(fs::path(run_dir_) / "metrics.jsonl", start_step);
      if (!settings_.quiet) log.info("resumed from {} at step {}", path.string(), start_step);
      if (start_step >= config_.steps && !settings_.quiet)
        log.info("{} already reached train.steps = {}; raise train.steps to train further, or use --out DIR (or "
                 "--set run.name=...) for a new run", run_dir_, config_.steps);
    }
  }
  if (start_step == 0 && !settings_.init_from.empty()) {
    // Initial weights (e.g. from `pithtrain convert import`): model.safetensors names, or a checkpoint's.
    SafetensorsFile file = load_safetensors(settings_.init_from);
    const std::string prefix = file.find("model/embedding.weight") ? "model/" : "";
    std::vector<NamedTensor> targets;
    for (const auto& parameter : master_) targets.push_back({parameter.name, parameter.tensor});
    // Router buffers (e.g. the aux_free bias) come along when the file has them; new ones start at zero.
    for (const auto& item : buffers())
      if (file.find(prefix + item.name) != nullptr) targets.push_back(item);
    load_tensors(file, targets, "model/", prefix, settings_.init_from);
    copy_master_to_model();
    if (!settings_.quiet) log.info("initialised the weights from {}", settings_.init_from);
  }
  std::ofstream metrics(run_dir_ + "/metrics.jsonl", start_step > 0 ? std::ios::app : std::ios::trunc);
  std::unique_ptr<RoutingTrace> trace;
  if (!settings_.trace_routing.empty())
    trace = std::make_unique<RoutingTrace>(settings_.trace_routing, model_->num_moe_layers(), model_->dims().num_experts, start_step);
  std::unique_ptr<StepProfiler> profiler;
  if (!settings_.profile.empty())
    profiler = std::make_unique<StepProfiler>(settings_.profile, run_dir_, c10::Device(config_.device).is_cuda());

  const int64_t tokens_per_step = config_.batch_size * config_.micro_batches * config_.seq_len / config_.context_parallel;
  const double flops_per_token = flops_per_token_;
  double lr = 0, window_tokens = 0, window_seconds = 0, total_seconds = 0;
  std::vector<at::Tensor> step_load;  // per MoE layer, this step's tokens_per_expert
  std::map<std::string, double> step_loss_terms;  // router loss terms, mean over the step's micro-batches
  std::vector<double> step_dropped;               // per MoE layer, dropped share this step (-1: dropless)
  std::map<std::string, double> step_grad_norms;  // gradient norm by parameter group, before clipping
  std::vector<at::Tensor> last_active;            // per MoE layer [E]: the last step the expert got a token
  std::set<size_t> warned_dead, warned_collapse;  // MoE layers already warned about
  StepFunctions step_functions;
  step_functions.micro_batches = config_.micro_batches;
  std::vector<at::Tensor> step_batches;  // this step's micro-batches [batch_size, seq_len + 1], read at its start
  auto next_micro_batch = [&] {
    std::vector<uint64_t> offsets;
    // Data parallel: the global batch is batch_size x ranks windows in the one-process order; each rank
    // takes its consecutive slice, so N ranks see exactly what one process with N x the batch would.
    for (int64_t row = 0; row < config_.batch_size * ranks; ++row) {
      const uint64_t offset = train_order_->next();
      if (row / config_.batch_size == rank) offsets.push_back(offset);
    }
    return dataset_->windows(offsets, config_.seq_len + 1);
  };
  // The global-batch balance loss under gradient accumulation (Router::needs_step_counts): route every
  // micro-batch of the step without gradients first, so each micro-batch's loss uses the step's counts.
  const bool count_step_routing = config_.micro_batches > 1 && model_->needs_step_counts();
  auto count_routing = [&] {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> counts;
    for (const auto& batch : step_batches) {
      ModelOutput output = forward_gathered(batch);
      counts.resize(output.tokens_per_expert.size());
      for (size_t layer = 0; layer < counts.size(); ++layer)
        counts[layer] = counts[layer].defined() ? counts[layer] + output.tokens_per_expert[layer]
                                                : output.tokens_per_expert[layer].to(at::kDouble);
    }
    if (communicator_) communicator_->all_reduce_sum(counts);
    model_->set_step_counts(counts);
  };
  // The step's routing statistics, from a forward's output whose first MoE layer is `first_layer`.
  auto record_routing = [&](const ModelOutput& output, size_t first_layer) {
    const double share = 1.0 / static_cast<double>(config_.micro_batches);
    for (size_t index = 0; index < output.tokens_per_expert.size(); ++index) {
      const size_t layer = first_layer + index;
      if (step_load.size() <= layer) step_load.resize(layer + 1);
      if (step_dropped.size() <= layer) step_dropped.resize(layer + 1, -1.0);
      const at::Tensor& load = output.tokens_per_expert[index];
      step_load[layer] = step_load[layer].defined() ? step_load[layer] + load : load.clone();
      if (output.dropped_fraction[index].defined())
        step_dropped[layer] = std::max(step_dropped[layer], 0.0) + output.dropped_fraction[index].item<double>() * share;
    }
    for (const auto& [name, value] : output.router_loss_terms) step_loss_terms[name] += value.item<double>() * share;
  };
  step_functions.forward = [&](int64_t index) {
    ModelOutput output = model_->forward(step_batches.at(index));
    record_routing(output, 0);
    return MicroBatchLoss{output.loss, output.cross_entropy.item<double>(), output.aux_loss.item<double>(),
                          config_.batch_size * config_.seq_len};
  };
  step_functions.units = model_->num_units();
  step_functions.stage_chunks = stage_chunks_;
  step_functions.activation_shape = {config_.batch_size, config_.seq_len / config_.context_parallel, model_->dims().hidden_size};
  step_functions.activation_dtype = config_.dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
  step_functions.tokens_per_micro_batch = config_.batch_size * config_.seq_len / config_.context_parallel;
  step_functions.forward_unit = [&](int64_t unit, int64_t micro_batch, const at::Tensor& input) {
    ModelOutput output;
    UnitOutput result = model_->forward_unit(unit, input, step_batches.at(micro_batch), output);
    if (at::GradMode::is_enabled()) record_routing(output, std::max<int64_t>(0, model_->moe_layer_of_unit(unit)));
    return result;
  };
  step_functions.zero_grad = [&] {
    for (auto* list : {&parameters_, &master_})
      for (auto& parameter : *list) parameter.tensor.mutable_grad() = at::Tensor();
  };
  step_functions.clip_gradients = [&] {
    if (communicator_) {
      // Data parallel: the mean gradient over ranks (every trainable tensor, in one buffer). An expert
      // block already holds the gradients of every token of its expert group (the all-to-all's
      // backward brought them), so it is summed over the ranks holding the same block only.
      std::vector<at::Tensor> replicated, expert_blocks;
      for (auto& parameter : parameters_) {
        if (frozen_.count(parameter.name) || flat_shards_.count("model/" + parameter.name)) continue;
        if (pipeline_group_ && !owned_.count(parameter.name)) continue;  // another stage trains it
        if (!parameter.tensor.grad().defined()) parameter.tensor.mutable_grad() = at::zeros_like(parameter.tensor);
        // A schedule that reduces gradients has already averaged the replicated ones.
        if (parameter.expert_sharded) expert_blocks.push_back(parameter.tensor.grad());
        else if (!schedule_->reduces_gradients()) replicated.push_back(parameter.tensor.grad());
      }
      communicator_->all_reduce_sum(replicated);
      if (expert_data_group_) expert_data_group_->all_reduce_sum(expert_blocks);
      for (auto* grads : {&replicated, &expert_blocks})
        for (auto& grad : *grads) grad.div_(static_cast<double>(communicator_->size()));
    }
    at::NoGradGuard no_grad;
    if (mixed_precision_)
      for (size_t i = 0; i < parameters_.size(); ++i)
        master_[i].tensor.mutable_grad() =
            parameters_[i].tensor.grad().defined() ? parameters_[i].tensor.grad().to(at::kFloat) : at::Tensor();
    // Squared norms by parameter group, replicated tensors, expert blocks and flat shards apart: the
    // blocks' are summed over the expert group and the shards' over all ranks, so every rank clips by
    // the norm of the whole model.
    enum { kReplicated, kExpertBlock, kFlatShard };
    std::map<std::string, std::array<double, 3>> squares;  // group -> squares of each kind
    // Under pipeline parallelism each stage has other groups: every rank lists them all, so the sums
    // over the stages line up.
    if (pipeline_group_)
      for (const auto& [group, counts] : parameter_groups_)
        if (counts.first > 0) squares[group] = {0.0, 0.0, 0.0};
    std::vector<at::Tensor> parameter_squares;
    for (auto& parameter : master_)
      if (parameter.tensor.grad().defined()) parameter_squares.push_back(parameter.tensor.grad().to(at::kDouble).pow(2).sum());
    at::Tensor values = parameter_squares.empty() ? at::zeros({0}, at::kDouble) : at::stack(parameter_squares).cpu();  // one sync
    const double* value = values.data_ptr<double>();
    for (auto& parameter : master_) {
      if (!parameter.tensor.grad().defined()) continue;
      const int kind = parameter.expert_sharded ? kExpertBlock : flat_shards_.count("model/" + parameter.name) ? kFlatShard : kReplicated;
      squares[parameter_group(parameter.name)][kind] += *value++;
    }
    for (auto [kind, group] : {std::pair{kExpertBlock, expert_group_.get()}, {kFlatShard, communicator_.get()}}) {
      if (group == nullptr || (kind == kFlatShard && flat_shards_.empty())) continue;
      std::vector<at::Tensor> sums = {at::zeros({static_cast<int64_t>(squares.size())}, at::kDouble)};
      int64_t index = 0;
      for (const auto& [name, entry] : squares) sums[0][index++] = entry[kind];
      group->all_reduce_sum(sums);
      index = 0;
      for (auto& [name, entry] : squares) entry[kind] = sums[0][index++].item<double>();
    }
    if (pipeline_group_) {  // each stage's parameters are its own
      std::vector<at::Tensor> sums = {at::zeros({static_cast<int64_t>(squares.size()), 3}, at::kDouble)};
      int64_t index = 0;
      for (const auto& [name, entry] : squares) {
        for (int kind = 0; kind < 3; ++kind) sums[0][index][kind] = entry[kind];
        ++index;
      }
      pipeline_group_->all_reduce_sum(sums);
      index = 0;
      for (auto& [name, entry] : squares) {
        for (int kind = 0; kind < 3; ++kind) entry[kind] = sums[0][index][kind].item<double>();
        ++index;
      }
    }
    double total_square = 0;
    step_grad_norms.clear();
    for (const auto& [group, entry] : squares) {
      const double square = entry[kReplicated] + entry[kExpertBlock] + entry[kFlatShard];
      step_grad_norms[group] = std::sqrt(square);
      total_square += square;
    }
    const double total = std::sqrt(total_square);
    if (config_.grad_clip > 0 && total > config_.grad_clip)
      for (auto& parameter : master_)
        if (parameter.tensor.grad().defined()) parameter.tensor.mutable_grad().mul_(config_.grad_clip / (total + 1e-6));
    return total;
  };
  step_functions.optimizer_step = [&] {
    optimizer_->step(lr);
    copy_master_to_model();
  };
  step_functions.after_optimizer_step = [&] { model_->after_optimizer_step(); };

  StopSignals stop_signals;
  double lifetime_peak_memory_mb = 0;  // VmHWM restarts each step, so the process's peak is kept here
  int64_t step = start_step;
  int64_t last_saved = start_step;
  auto save = [&](int64_t at_step) {
    last_saved = at_step;
    std::vector<NamedTensor> tensors = gathered(checkpoint_tensors());  // every rank: a collective under expert parallel
    if (!writes_checkpoints) return;
    fs::path path = checkpoints.save(at_step, tensors, checkpoint_metadata(at_step, smoothed));
    if (!settings_.quiet) log.info("saved checkpoint {}", path.string());
  };
  if (!settings_.quiet && step < config_.steps)
    log.info("resident memory before the first step: {:.0f} MiB (LibTorch, the model, the data's index)", resident_memory_mb());
  while (step < config_.steps) {
    ++step;
    lr = learning_rate(config_, step);
    step_load.clear();
    step_loss_terms.clear();
    step_dropped.clear();
    if (profiler) profiler->before_step(step);
    // The step's own peak resident memory: the high-water mark restarts here, the lifetime one is kept.
    lifetime_peak_memory_mb = std::max(lifetime_peak_memory_mb, peak_resident_memory_mb());
    const bool step_peak_known = reset_peak_resident_memory();
    auto step_start = std::chrono::steady_clock::now();
    step_batches.clear();
    for (int64_t micro_batch = 0; micro_batch < config_.micro_batches; ++micro_batch) step_batches.push_back(next_micro_batch());
    if (count_step_routing) count_routing();
    StepResult result = schedule_->run_step(step_functions);
    if (count_step_routing) model_->set_step_counts({});
    double step_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - step_start).count();
    const double step_peak_memory_mb = peak_resident_memory_mb();  // before evaluation can raise it
    if (profiler) profiler->after_step(step, settings_.quiet);
    bool stop = g_stop_signal != 0;
    if (world_) {
      // Ranks agree on the logged figures (means over the data ranks), the load (sums) and on stopping
      // (any rank's signal). Under pipeline parallelism each stage contributes its own layers and its
      // part of the loss (the cross-entropy comes from the last stage), so every rank lists every MoE
      // layer and every router loss term, with zeros for what another stage has.
      if (pipeline_group_) {
        step_load.resize(model_->num_moe_layers());
        step_dropped.resize(model_->num_moe_layers(), -1.0);
        for (size_t layer = 0; layer < step_load.size(); ++layer)
          if (!step_load[layer].defined()) step_load[layer] = at::zeros({model_->dims().num_experts}, at::kLong), step_dropped[layer] = -1.0;
        if (!loss_terms_agreed_) {
          // Once: the union of the stages' term names (a stage without MoE layers has none).
          std::string mine;
          for (const auto& [name, value] : step_loss_terms) mine += name + ",";
          at::Tensor bytes = at::zeros({1024}, at::kByte);
          std::memcpy(bytes.data_ptr(), mine.data(), std::min<size_t>(mine.size(), 1023));
          at::Tensor all = world_->all_gather(bytes);
          std::set<std::string> names;
          for (int64_t rank = 0; rank < world_->size(); ++rank) {
            std::stringstream list(std::string(reinterpret_cast<const char*>(all.data_ptr<uint8_t>()) + rank * 1024));
            for (std::string name; std::getline(list, name, ',');) if (!name.empty()) names.insert(name);
          }
          loss_term_names_.assign(names.begin(), names.end());
          loss_terms_agreed_ = true;
        }
        for (const auto& name : loss_term_names_) step_loss_terms.try_emplace(name, 0.0);
      }
      std::vector<at::Tensor> shared = {at::tensor({result.loss, result.cross_entropy, result.aux_loss, stop ? 1.0 : 0.0}, at::kDouble)};
      for (auto& load : step_load) shared.push_back(load);
      for (auto& [name, value] : step_loss_terms) shared.push_back(at::tensor({value}, at::kDouble));
      // Dropped shares travel as share + 1 (0: dropless or another stage's layer) and come back as means.
      for (auto& dropped : step_dropped) shared.push_back(at::tensor({owns_moe_layer(&dropped - step_dropped.data()) ? dropped + 1.0 : 0.0}, at::kDouble));
      world_->all_reduce_sum(shared);
      const double n = static_cast<double>(communicator_->size());
      result.loss = shared[0][0].item<double>() / n, result.cross_entropy = shared[0][1].item<double>() / n;
      result.aux_loss = shared[0][2].item<double>() / n, stop = shared[0][3].item<double>() > 0;
      size_t index = 1 + step_load.size();
      for (auto& [name, value] : step_loss_terms) value = shared[index++].item<double>() / n;
      for (auto& dropped : step_dropped) dropped = shared[index++].item<double>() / n - 1.0;
      if (pipeline_group_) share_stage_buffers();  // the routers' buffers of every layer
    }
    if (!std::isfinite(result.loss))
      throw Error("loss became " + std::to_string(result.loss) + " at step " + std::to_string(step) +
                  "; lower train.lr or set train.grad_clip (see " + run_dir_ + "/metrics.jsonl)");
    window_tokens += static_cast<double>(tokens_per_step);
    window_seconds += step_seconds;
    total_seconds += step_seconds;
    smoothed = step == 1 ? result.cross_entropy : 0.9 * smoothed + 0.1 * result.cross_entropy;
    if (summary.losses.empty()) summary.first_loss = result.cross_entropy;
    summary.losses.emplace_back(step, result.cross_entropy);
    if (trace) trace->record(step, step_load);
    for (size_t layer = 0; layer < step_load.size(); ++layer) {  // the last step each expert got a token
      if (last_active.size() <= layer) last_active.push_back(at::full_like(step_load[layer], start_step, at::kLong));
      last_active[layer] = at::where(step_load[layer] > 0, at::full_like(last_active[layer], step), last_active[layer]);
    }
    const bool evaluate_now = config_.eval_every > 0 && step % config_.eval_every == 0;
    const double validation_loss = evaluate_now ? evaluate() : std::nan("");
    if (step % config_.log_every == 0 || step == 1 || step == config_.steps || evaluate_now) {
      const double tokens_per_second = window_tokens / std::max(window_seconds, 1e-9);
      const double mfu = tokens_per_second * flops_per_token / config_.peak_flops;
      window_tokens = window_seconds = 0;
      double imbalance = 0;
      int64_t dead_total = 0;
      double worst_dropped = -1;
      auto buffers = model_->router_buffers();
      std::string router_json = "[";
      for (size_t layer = 0; layer < step_load.size(); ++layer) {
        if (layer > 0) router_json += ",";
        const int64_t dead = ((step - last_active[layer]) >= config_.dead_expert_steps).sum().item<int64_t>();
        const double dropped = layer < step_dropped.size() ? step_dropped[layer] : -1.0;
        const LayerStats stats = router_stats(layer, step_load[layer], buffers[layer], dead, dropped);
        router_json += stats.json;
        imbalance = std::max(imbalance, stats.imbalance);
        worst_dropped = std::max(worst_dropped, dropped);
        dead_total += dead;
        // Warned once each: the failures people otherwise notice only when the loss stalls.
        if (dead > 0 && warned_dead.insert(layer).second)
          log.warn("MoE layer {}: {} expert(s) received no token in the last {} steps (dead experts; metrics.jsonl "
                   "router[].tokens_per_expert shows which)", layer, dead, config_.dead_expert_steps);
        if (stats.entropy < 0.5 && warned_collapse.insert(layer).second)
          log.warn("MoE layer {}: routing collapsed onto few experts at step {} (load entropy {:.2f} of 1, max/mean {:.2f}); "
                   "a balancing loss or aux_free routing counters this", layer, step, stats.entropy, stats.imbalance);
      }
      router_json += "]";
      metrics << std::setprecision(6) << "{\"step\":" << step << ",\"loss\":" << result.loss
              << ",\"cross_entropy\":" << result.cross_entropy << ",\"smoothed_loss\":" << smoothed
              << ",\"aux_loss\":" << result.aux_loss << ",\"lr\":" << lr
              << ",\"grad_norm\":" << result.grad_norm << ",\"grad_norms\":{";
      for (auto it = step_grad_norms.begin(); it != step_grad_norms.end(); ++it)
        metrics << (it == step_grad_norms.begin() ? "" : ",") << json_quote(it->first) << ":" << it->second;
      metrics << "},\"tokens_per_s\":" << tokens_per_second << ",\"mfu\":" << mfu
              << ",\"memory_mb\":" << resident_memory_mb() << ",\"peak_memory_mb\":"
              << (lifetime_peak_memory_mb = std::max(lifetime_peak_memory_mb, peak_resident_memory_mb()));
      if (step_peak_known) metrics << ",\"step_peak_memory_mb\":" << step_peak_memory_mb;
      metrics << ",\"state_mb\":" << state_mb();
      if (c10::Device(config_.device).is_cuda())
        metrics << ",\"device_memory_peak_mb\":" << device_memory_peak_mb(c10::Device(config_.device));
      if (evaluate_now) metrics << ",\"val_loss\":" << validation_loss;
      if (!step_loss_terms.empty()) {
        metrics << ",\"router_losses\":{";
        bool first = true;
        for (const auto& [name, value] : step_loss_terms) metrics << (first ? "" : ",") << json_quote(name) << ":" << value, first = false;
        metrics << "}";
      }
      metrics << ",\"router\":" << router_json << "}\n";
      metrics.flush();
      if (!settings_.quiet)
        log.info("step {:>5}/{} | loss {:.4f} (smoothed {:.4f}){} | aux {:.4f} | lr {:.2e} | grad norm {:.3f} | "
                 "{:.0f} tok/s | MFU {:.1f}% | router max/mean load {:.2f}{}{}",
                 step, config_.steps, result.cross_entropy, smoothed,
                 evaluate_now ? fmt::format(" | val {:.4f}", validation_loss) : std::string(), result.aux_loss, lr,
                 result.grad_norm, tokens_per_second, 100 * mfu, imbalance,
                 worst_dropped >= 0 ? fmt::format(" | dropped {:.1f}%", 100 * worst_dropped) : std::string(),
                 dead_total > 0 ? fmt::format(" | dead experts {}", dead_total) : std::string());
    }
    if (stop) {
      save(step);
      summary.interrupted = true;
      if (!settings_.quiet)
        log.warn("stopped by signal {} after step {}; the checkpoint is saved: rerun the same command to resume",
                 g_stop_signal.load(), step);
      break;
    }
    if (config_.checkpoint_every > 0 && step % config_.checkpoint_every == 0) save(step);
  }
  if (!summary.interrupted && last_saved != step) save(step);
  summary.steps = step;
  summary.seconds = total_seconds;
  summary.final_smoothed_loss = smoothed;
  summary.tokens_per_second = total_seconds > 0 ? tokens_per_step * static_cast<double>(summary.losses.size()) / total_seconds : 0;
  if (summary.interrupted) return summary;
  summary.validation_loss = evaluate();
  std::vector<NamedTensor> weights;
  for (const auto& parameter : master_) weights.push_back({parameter.name, parameter.tensor});
  weights = gathered(std::move(weights), "model/");
  for (const auto& item : buffers()) weights.push_back(item);
  if (writes_checkpoints) save_safetensors(run_dir_ + "/model.safetensors", weights, {{"step", std::to_string(step)}});
  if (!settings_.quiet) {
    const std::string validation = std::isnan(summary.validation_loss)
                                       ? std::string("no validation (eval.batches = 0)")
                                       : fmt::format("validation loss {:.4f}", summary.validation_loss);
    if (summary.losses.empty())
      log.info("done: nothing to train (already at step {}); {}", summary.steps, validation);
    else
      log.info("done: step {} ({} this run, {:.1f} s, {:.0f} tok/s); loss {:.4f} at the first step -> {:.4f} smoothed at "
               "the end; {}; peak resident memory {:.0f} MiB",
               summary.steps, summary.losses.size(), summary.seconds, summary.tokens_per_second, summary.first_loss,
               summary.final_smoothed_loss, validation, std::max(lifetime_peak_memory_mb, peak_resident_memory_mb()));
    log.info("outputs: {0}/config.toml, {0}/metrics.jsonl, {0}/model.safetensors, {0}/checkpoints/", run_dir_);
  }
  return summary;
}

}  // namespace pithtrain
