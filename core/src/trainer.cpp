// The training loop (DESIGN.md, "Data flow of one training step"), read top to bottom: start-up
// report, resume, then per step: micro-batches, the schedule's forward/backward/optimizer step,
// figures agreed over ranks, metrics, validation and checkpoints; at the end the model file.
#include "trainer.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>
#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/spdlog.h>

#include "gradients.h"
#include "metrics.h"
#include "profiler.h"
#include "run_directory.h"
#include "routing_trace.h"

namespace pithtrain {
namespace fs = std::filesystem;

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

}  // namespace

at::Tensor Trainer::next_micro_batch() {
  // Data parallel: the global batch is batch_size x ranks windows in the one-process order; each rank
  // takes its consecutive slice, so N ranks see exactly what one process with N x the batch would. The
  // ranks of a context group read the same sequences.
  const int64_t ranks = config_.data_parallel, rank = groups_.data ? groups_.data->rank() / config_.context_parallel : 0;
  std::vector<uint64_t> offsets;
  for (int64_t row = 0; row < config_.batch_size * ranks; ++row) {
    const uint64_t offset = train_order_->next();
    if (row / config_.batch_size == rank) offsets.push_back(offset);
  }
  return dataset_->windows(offsets, config_.seq_len + 1);
}

StepFunctions Trainer::step_functions(const std::vector<at::Tensor>& batches, StepFigures& figures, const double& lr) {
  StepFunctions step;
  step.micro_batches = config_.micro_batches;
  step.forward = [&, this](int64_t index) {
    ModelOutput output = model_->forward(batches.at(index));
    figures.record_routing(output, 0, config_.micro_batches);
    return MicroBatchLoss{output.loss, output.cross_entropy.item<double>(), output.aux_loss.item<double>(),
                          config_.batch_size * config_.seq_len};
  };
  step.units = model_->num_units();
  step.stage_chunks = stages_.stage_chunks;
  step.activation_shape = {config_.batch_size, config_.seq_len / config_.context_parallel, model_->dims().hidden_size};
  step.activation_dtype = config_.dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
  step.tokens_per_micro_batch = config_.batch_size * config_.seq_len / config_.context_parallel;
  step.forward_unit = [&, this](int64_t unit, int64_t micro_batch, const at::Tensor& input) {
    ModelOutput output;
    UnitOutput result = model_->forward_unit(unit, input, batches.at(micro_batch), output);
    if (at::GradMode::is_enabled())
      figures.record_routing(output, std::max<int64_t>(0, model_->moe_layer_of_unit(unit)), config_.micro_batches);
    return result;
  };
  step.zero_grad = [this] {
    for (auto* list : {&weights_.model, &weights_.master})
      for (auto& parameter : *list) parameter.tensor.mutable_grad() = at::Tensor();
  };
  step.clip_gradients = [&, this] {
    return reduce_and_clip_gradients(weights_, groups_, stages_, frozen_, state_->flat_shards(), schedule_->reduces_gradients(),
                                     parameter_groups_, config_.grad_clip, figures.grad_norms);
  };
  step.optimizer_step = [&, this] {
    optimizer_->step(lr);
    weights_.copy_master_to_model();
  };
  step.after_optimizer_step = [this] { model_->after_optimizer_step(); };
  return step;
}

TrainSummary Trainer::run() {
  auto& log = logger();
  TrainSummary summary;
  summary.run_dir = run_dir_;
  // One run per directory (run_directory.h), decided before anything is written: the newest valid
  // checkpoint is resumed when it is this run's and its [model] matches; a new run never mixes with another.
  CheckpointFolder checkpoints(checkpoint_dir_, config_.checkpoint_keep);
  const bool writes_checkpoints = !groups_.world || groups_.world->rank() == 0;
  const std::string model_toml = options_.table("model").resolved_toml();
  std::optional<std::pair<fs::path, SafetensorsFile>> latest;
  if (config_.resume) {
    latest = checkpoints.load_latest();
    // Checkpoints that all fail to load are the run's only state: refused, never trained over.
    if (const auto files = checkpoints.list(); !latest && !files.empty()) {
      std::string reason;
      try {
        load_safetensors(files.front().string());
      } catch (const Error& error) {
        reason = error.what();
      }
      throw Error("no checkpoint of " + checkpoint_dir_ + " loads (" + std::to_string(files.size()) + " file(s); the newest: " +
                  reason + "); nothing was written. Restore one from a copy, or use --out NEW_DIR, or --move-aside with " +
                  "--set checkpoint.resume=false to start over beside them");
    }
  }
  std::string resumed_run_id;  // empty for checkpoints written before run ids
  if (latest) {
    RunState::check_same_model(latest->first, latest->second, model_toml, base_dir_);
    if (auto id = latest->second.metadata.find("run_id"); id != latest->second.metadata.end()) resumed_run_id = id->second;
  }
  const RunClaim claim = claim_run_directory(base_dir_, latest.has_value(), resumed_run_id, settings_.move_aside);
  // Every rank has looked before rank 0 moves or writes anything, and rank 0 has before the others write.
  auto barrier = [this] {
    std::vector<at::Tensor> token = {at::zeros({1}, at::kDouble)};
    if (groups_.world) groups_.world->all_reduce_sum(token);
  };
  barrier();
  if (writes_checkpoints) apply_run_claim(base_dir_, claim);
  barrier();
  run_id_ = claim.run_id;
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
    log.info("config: {}", options_.source());
    log.info("components:");
    for (const auto& entry : manifest_)
      log.info("  {:<29} = {:<14} v{:<6} {}{}", entry.config_key, entry.plugin->name(), entry.plugin->descriptor->version,
               entry.plugin->file.string(), entry.layers.empty() ? "" : " (layers " + entry.layers + ")");
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

  // Resume the newest valid checkpoint, or start from --init-from weights.
  double smoothed = 0;
  int64_t start_step = 0;
  if (latest) {
    const ResumePoint resumed = state_->resume(latest->first, latest->second);
    latest.reset();  // the tensors are in the model and optimizer now
    start_step = summary.resumed_from = resumed.step;
    train_order_->set_position(resumed.data_position);
    smoothed = resumed.smoothed_loss;
    truncate_metrics(fs::path(run_dir_) / "metrics.jsonl", start_step);
    if (!settings_.quiet) log.info("resumed from {} at step {} (run {})", resumed.path.string(), start_step, run_id_);
    if (start_step >= config_.steps && !settings_.quiet)
      log.info("{} already reached train.steps = {}; raise train.steps to train further, or use --out DIR (or "
               "--set run.name=...) for a new run", run_dir_, config_.steps);
  } else if (!settings_.quiet) {
    log.info("{} run {} in {}{}", claim.new_run ? "new" : "restarting (no checkpoint yet)", run_id_, base_dir_,
             claim.move_aside ? " (the old run was moved to " + claim.moved_to.string() + ")" : std::string());
  }
  if (start_step == 0 && !settings_.init_from.empty()) {
    state_->init_from(settings_.init_from);
    if (!settings_.quiet) log.info("initialised the weights from {}", settings_.init_from);
  }
  // TensorBoard files are rank 0's alone: every rank logs the same agreed figures.
  MetricsLog metrics(run_dir_ + "/metrics.jsonl", config_, flops_per_token_, start_step, settings_.quiet,
                     config_.tensorboard && writes_checkpoints ? run_dir_ + "/tensorboard" : "");
  std::unique_ptr<RoutingTrace> trace;
  if (!settings_.trace_routing.empty())
    trace = std::make_unique<RoutingTrace>(settings_.trace_routing, model_->num_moe_layers(), model_->dims().num_experts, start_step);
  std::unique_ptr<StepProfiler> profiler;
  if (!settings_.profile.empty())
    profiler = std::make_unique<StepProfiler>(settings_.profile, run_dir_, c10::Device(config_.device).is_cuda());

  const int64_t tokens_per_step = config_.batch_size * config_.micro_batches * config_.seq_len / config_.context_parallel;
  // The global-batch balance loss under gradient accumulation (Router::needs_step_counts): every
  // micro-batch of the step is routed without gradients first, so each micro-batch's loss uses the step's counts.
  const bool count_step_routing = config_.micro_batches > 1 && model_->needs_step_counts();
  double lr = 0, total_seconds = 0;
  std::vector<at::Tensor> step_batches;  // this step's micro-batches [batch_size, seq_len + 1], read at its start
  StepFigures figures;
  const StepFunctions step_functions = this->step_functions(step_batches, figures, lr);

  StopSignals stop_signals;
  int64_t step = start_step;
  int64_t last_saved = start_step;
  auto last_save_time = std::chrono::steady_clock::now();
  auto save = [&](int64_t at_step) {
    last_saved = at_step;
    last_save_time = std::chrono::steady_clock::now();
    std::vector<NamedTensor> tensors = state_->gathered(state_->tensors());  // every rank: a collective under expert parallel
    if (!writes_checkpoints) return;
    fs::path path = checkpoints.save(at_step, tensors,
                                     state_->metadata(at_step, train_order_->position(), smoothed, model_toml, config_.data_path, run_id_));
    if (!settings_.quiet) log.info("saved checkpoint {}", path.string());
  };
  if (!settings_.quiet && step < config_.steps)
    log.info("resident memory before the first step: {:.0f} MiB (LibTorch, the model, the data's index)", resident_memory_mb());
  while (step < config_.steps) {
    ++step;
    lr = learning_rate(config_, step);
    figures = StepFigures{};
    if (profiler) profiler->before_step(step);
    // The step's own peak resident memory: the high-water mark restarts here, the lifetime one is kept.
    metrics.lifetime_peak_memory_mb();
    figures.peak_memory_known = reset_peak_resident_memory();
    auto step_start = std::chrono::steady_clock::now();
    step_batches.clear();
    for (int64_t micro_batch = 0; micro_batch < config_.micro_batches; ++micro_batch) step_batches.push_back(next_micro_batch());
    if (count_step_routing) {
      at::NoGradGuard no_grad;
      std::vector<at::Tensor> counts;
      for (const auto& batch : step_batches) {
        ModelOutput output = forward_gathered(batch);
        counts.resize(output.tokens_per_expert.size());
        for (size_t layer = 0; layer < counts.size(); ++layer)
          counts[layer] = counts[layer].defined() ? counts[layer] + output.tokens_per_expert[layer]
                                                  : output.tokens_per_expert[layer].to(at::kDouble);
      }
      if (groups_.data) groups_.data->all_reduce_sum(counts);
      model_->set_step_counts(counts);
    }
    figures.result = schedule_->run_step(step_functions);
    if (count_step_routing) model_->set_step_counts({});
    figures.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - step_start).count();
    figures.peak_memory_mb = peak_resident_memory_mb();  // before evaluation can raise it
    if (profiler) profiler->after_step(step, settings_.quiet);
    bool stop = g_stop_signal != 0;
    // Periodic checkpoints by steps and by wall-clock time (checkpoint.every, checkpoint.every_minutes).
    bool save_due = (config_.checkpoint_every > 0 && step % config_.checkpoint_every == 0) ||
                    (config_.checkpoint_every_minutes > 0 &&
                     std::chrono::steady_clock::now() - last_save_time >= std::chrono::duration<double>(60 * config_.checkpoint_every_minutes));
    if (groups_.world) {
      stop = agree_step_figures(figures, stop, save_due, groups_, stages_, *model_, loss_term_names_);
      if (groups_.pipeline) share_stage_buffers(*groups_.pipeline, stages_, *model_, state_->buffers());
    }
    const StepResult& result = figures.result;
    if (!std::isfinite(result.loss))
      throw Error("loss became " + std::to_string(result.loss) + " at step " + std::to_string(step) +
                  "; lower train.lr or set train.grad_clip (see " + run_dir_ + "/metrics.jsonl)");
    total_seconds += figures.seconds;
    smoothed = step == 1 ? result.cross_entropy : 0.9 * smoothed + 0.1 * result.cross_entropy;
    if (summary.losses.empty()) summary.first_loss = result.cross_entropy;
    summary.losses.emplace_back(step, result.cross_entropy);
    if (trace) trace->record(step, figures.load);
    metrics.track(step, figures, tokens_per_step);
    const bool evaluate_now = config_.eval_every > 0 && step % config_.eval_every == 0;
    const double validation_loss = evaluate_now ? evaluate() : std::nan("");
    if (step % config_.log_every == 0 || step == 1 || step == config_.steps || evaluate_now)
      metrics.write(step, figures, smoothed, lr, evaluate_now, validation_loss, state_->state_mb(), model_->router_buffers());
    if (stop) {
      save(step);
      summary.interrupted = true;
      if (!settings_.quiet)
        log.warn("stopped by signal {} after step {}; the checkpoint is saved: rerun the same command to resume",
                 g_stop_signal.load(), step);
      break;
    }
    if (save_due) save(step);
  }
  if (!summary.interrupted && last_saved != step) save(step);
  summary.steps = step;
  summary.seconds = total_seconds;
  summary.final_smoothed_loss = smoothed;
  summary.tokens_per_second = total_seconds > 0 ? tokens_per_step * static_cast<double>(summary.losses.size()) / total_seconds : 0;
  if (summary.interrupted) return summary;
  summary.validation_loss = evaluate();
  std::vector<NamedTensor> weights = state_->final_weights();
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
               summary.final_smoothed_loss, validation, metrics.lifetime_peak_memory_mb());
    log.info("outputs: {0}/config.toml, {0}/metrics.jsonl, {0}/model.safetensors, {0}/checkpoints/", run_dir_);
  }
  return summary;
}

}  // namespace pithtrain
