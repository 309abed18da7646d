// Reads the run settings: every [train], [eval], [checkpoint], [metrics], [data], [run] and [parallel] key, checked
// where it is read, before any file, dataset or process group is touched.
#include "train_config.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>

#include "mesh.h"
#include "pithtrain/error.h"

namespace pithtrain {

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

// Default peak FLOP/s when train.peak_tflops is not set: H100/H200 dense bf16 for CUDA; for the CPU,
// 32 float32 FLOPs per cycle (two AVX2 FMA units) at 2.5 GHz per core.
double default_peak_flops(const std::string& device) {
  if (device.rfind("cuda", 0) == 0) return 989e12;
  return static_cast<double>(std::max<long>(1, ::sysconf(_SC_NPROCESSORS_ONLN))) * 32 * 2.5e9;
}

}  // namespace

TrainConfig read_train_config(Options& options, int64_t processes) {
  TrainConfig config;
  Options train = options.table("train");
  config.steps = train.integer("steps", 300, Range::at_least(1));
  config.batch_size = train.integer("batch_size", 16, Range::at_least(1));
  read_mesh(options, processes, config);  // mesh.h
  // train.global_batch_size fixes the sequences per optimizer step whatever the layout: micro_batches
  // follows from it unless set too.
  const int64_t global_batch_size = train.integer("global_batch_size", 0, Range::at_least(0));
  const int64_t per_micro_batch = config.batch_size * config.data_parallel;
  int64_t derived_micro_batches = 1;
  if (global_batch_size > 0 && !train.has("micro_batches")) {
    if (global_batch_size % per_micro_batch != 0)
      throw Error(train.where("global_batch_size") + ": train.global_batch_size = " + std::to_string(global_batch_size) +
                  " is not a multiple of train.batch_size x parallel.data = " + std::to_string(config.batch_size) + " x " +
                  std::to_string(config.data_parallel) + " = " + std::to_string(per_micro_batch));
    derived_micro_batches = global_batch_size / per_micro_batch;
  }
  config.micro_batches = train.integer("micro_batches", derived_micro_batches, Range::at_least(1));
  if (global_batch_size > 0 && config.micro_batches * per_micro_batch != global_batch_size)
    throw Error(train.where("micro_batches") + ": train.global_batch_size = " + std::to_string(global_batch_size) +
                " but train.batch_size x train.micro_batches x parallel.data = " + std::to_string(config.batch_size) + " x " +
                std::to_string(config.micro_batches) + " x " + std::to_string(config.data_parallel) +
                "; leave train.micro_batches out to derive it");
  config.seq_len = train.integer("seq_len", 128, Range::at_least(1));
  if (config.context_parallel > 1 && config.seq_len % (2 * config.context_parallel) != 0)
    throw Error(train.where("seq_len") + ": train.seq_len = " + std::to_string(config.seq_len) + " must be a multiple of " +
                "2 x parallel.context = " + std::to_string(2 * config.context_parallel) + " (each context rank takes two " +
                "equal chunks of every sequence)");
  config.lr = train.number("lr", 3e-3, Range::above(0));
  config.min_lr = train.number("min_lr", config.lr * 0.1, Range::closed(0, config.lr));
  config.warmup_steps = train.integer("warmup_steps", std::min<int64_t>(100, config.steps / 10), Range::at_least(0));
  config.lr_schedule = train.text("lr_schedule", "cosine");
  config.decay_fraction = train.number("decay_fraction", 0.2, Range::left_open(0, 1));
  config.grad_clip = train.number("grad_clip", 1.0, Range::at_least(0));
  config.log_every = train.integer("log_every", 10, Range::at_least(1));
  config.seed = static_cast<uint64_t>(train.integer("seed", 1234, Range::at_least(0)));
  config.device = train.text("device", "cpu");
  config.dtype = train.text("dtype", "float32");
  config.peak_flops = train.number("peak_tflops", default_peak_flops(config.device) / 1e12, Range::above(0)) * 1e12;
  config.deterministic = train.boolean("deterministic", false);
  config.freeze = train.text_list("freeze", {});
  config.dead_expert_steps = train.integer("dead_expert_steps", 100, Range::at_least(1));
  config.loss_chunk_tokens = train.integer("loss_chunk_tokens", 0, Range::at_least(0));
  Options eval = options.table("eval");
  config.eval_every = eval.integer("every", 0, Range::at_least(0));
  config.eval_batches = eval.integer("batches", 8, Range::at_least(0));
  Options checkpoint = options.table("checkpoint");
  // Crash-safe by default: a run killed by the OOM killer or a node failure resumes from its last save.
  config.checkpoint_every = checkpoint.integer("every", 100, Range::at_least(0));
  config.checkpoint_every_minutes = checkpoint.number("every_minutes", 15.0, Range::at_least(0));
  config.checkpoint_keep = checkpoint.integer("keep", 3, Range::at_least(1));
  config.resume = checkpoint.boolean("resume", true);
  config.tensorboard = options.table("metrics").boolean("tensorboard", true);
  config.run_name = options.table("run").text("name", "tiny");
  Options data = options.table("data");
  config.data_path = data.required_text("path");
  config.validation_fraction = data.number("validation_fraction", 0.05, Range::half_open(0, 1));

  if (config.device != "cpu" && config.device.rfind("cuda", 0) != 0)
    throw Error(train.where("device") + ": train.device must be \"cpu\" or \"cuda[:N]\", got \"" + config.device + "\"");
  if (config.dtype != "float32" && config.dtype != "bfloat16")
    throw Error(train.where("dtype") + ": train.dtype must be \"float32\" or \"bfloat16\", got \"" + config.dtype + "\"");
  if (config.lr_schedule != "cosine" && config.lr_schedule != "wsd" && config.lr_schedule != "constant")
    throw Error(train.where("lr_schedule") + ": train.lr_schedule must be \"cosine\", \"wsd\" or \"constant\", got \"" +
                config.lr_schedule + "\"");
  config.collective_timeout_seconds = train.number("collective_timeout_seconds", 300.0, Range::above(0));
  return config;
}

}  // namespace pithtrain
