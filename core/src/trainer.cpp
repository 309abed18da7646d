// The training loop (DESIGN.md, "Data flow of one training step").
#include "trainer.h"

#include <chrono>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <sstream>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/grad_mode.h>
#include <spdlog/spdlog.h>

#include "pithtrain/nn.h"

namespace pithtrain {
namespace fs = std::filesystem;

double learning_rate(const TrainConfig& config, int64_t step) {
  if (config.warmup_steps > 0 && step <= config.warmup_steps)
    return config.lr * static_cast<double>(step) / static_cast<double>(config.warmup_steps);
  const double decay_steps = std::max<int64_t>(1, config.steps - config.warmup_steps);
  const double progress = std::min(1.0, static_cast<double>(step - config.warmup_steps) / decay_steps);
  return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + std::cos(M_PI * progress));
}

Trainer::Trainer(Options config, RunSettings settings) : options_(std::move(config)), settings_(std::move(settings)) {
  Options train = options_.table("train");
  config_.steps = train.integer("steps", 300);
  config_.batch_size = train.integer("batch_size", 16);
  config_.micro_batches = train.integer("micro_batches", 1);
  config_.seq_len = train.integer("seq_len", 128);
  config_.lr = train.number("lr", 3e-3);
  config_.min_lr = train.number("min_lr", config_.lr * 0.1);
  config_.warmup_steps = train.integer("warmup_steps", std::min<int64_t>(100, config_.steps / 10));
  config_.grad_clip = train.number("grad_clip", 1.0);
  config_.log_every = train.integer("log_every", 10);
  config_.eval_batches = train.integer("eval_batches", 8);
  config_.seed = static_cast<uint64_t>(train.integer("seed", 1234));
  config_.device = train.text("device", "cpu");
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
  if (!(config_.validation_fraction >= 0 && config_.validation_fraction < 1))
    throw Error(data.where("validation_fraction") + ": data.validation_fraction must be in [0, 1)");

  Options plugins = options_.table("plugins");
  registry_ = std::make_unique<PluginRegistry>(default_search_dirs(plugins.text_list("paths", {})),
                                               settings_.plugin_files);

  at::manual_seed(config_.seed);
  PluginContext context;
  context.device = c10::Device(config_.device);
  context.logger = &logger();
  model_ = std::make_unique<Model>(options_.table("model"), *registry_, context);
  manifest_ = model_->manifest();
  parameters_ = model_->parameters();

  Options optimizer_options = options_.table("optimizer");
  const LoadedPlugin& optimizer_plugin = registry_->get("optimizer", optimizer_options.text("plugin", "adamw"));
  PluginContext optimizer_context = context;
  optimizer_context.dims = model_->dims();
  optimizer_context.parameters = parameters_;
  optimizer_ = make_optimizer(optimizer_plugin, optimizer_options, optimizer_context);
  Options schedule_options = options_.table("schedule");
  const LoadedPlugin& schedule_plugin = registry_->get("schedule", schedule_options.text("plugin", "single"));
  schedule_ = make_schedule(schedule_plugin, schedule_options, optimizer_context);
  manifest_.push_back({"optimizer.plugin", &optimizer_plugin});
  manifest_.push_back({"schedule.plugin", &schedule_plugin});

  options_.check_unknown_keys();

  dataset_ = std::make_unique<TokenDataset>(config_.data_path);
  if (static_cast<int64_t>(dataset_->header().vocab_size) > model_->dims().vocab_size)
    throw Error(options_.table("model").where("vocab_size") + ": model.vocab_size is " +
                std::to_string(model_->dims().vocab_size) + " but dataset '" + config_.data_path + "' has tokens up to " +
                std::to_string(dataset_->header().vocab_size) + "; raise model.vocab_size");
  train_end_ = static_cast<uint64_t>(std::llround(dataset_->size() * (1.0 - config_.validation_fraction)));
  if (train_end_ < static_cast<uint64_t>(config_.seq_len + 1) * 2)
    throw Error("dataset '" + config_.data_path + "' has " + std::to_string(dataset_->size()) +
                " tokens, too few for train.seq_len " + std::to_string(config_.seq_len));
}

double Trainer::evaluate() {
  if (config_.eval_batches < 1 || dataset_->size() - train_end_ < static_cast<uint64_t>(config_.seq_len + 1))
    return std::nan("");
  at::NoGradGuard no_grad;
  std::mt19937_64 generator(config_.seed + 1);
  double total = 0;
  for (int64_t i = 0; i < config_.eval_batches; ++i) {
    at::Tensor tokens = dataset_->sample(config_.batch_size, config_.seq_len + 1, train_end_, dataset_->size(), generator);
    total += model_->forward(tokens).cross_entropy.item<double>();
  }
  return total / static_cast<double>(config_.eval_batches);
}

namespace {

std::string timestamp() {
  std::time_t now = std::time(nullptr);
  char buffer[32];
  std::strftime(buffer, sizeof(buffer), "%Y%m%d-%H%M%S", std::localtime(&now));
  return buffer;
}

// max(load) / mean(load) for one layer's tokens_per_expert: 1.0 is perfectly balanced.
double max_over_mean(const at::Tensor& tokens_per_expert) {
  at::Tensor load = tokens_per_expert.to(at::kDouble);
  double mean = load.mean().item<double>();
  return mean > 0 ? load.max().item<double>() / mean : 0.0;
}

}  // namespace

TrainSummary Trainer::run() {
  auto& log = logger();
  TrainSummary summary;
  summary.run_dir = settings_.out_dir.empty() ? "runs/" + config_.run_name + "-" + timestamp() : settings_.out_dir;
  fs::create_directories(summary.run_dir);
  const std::string resolved = options_.resolved_toml();
  std::ofstream(summary.run_dir + "/config.toml") << resolved << "\n";
  if (!settings_.quiet) {
    log.info("components:");
    for (const auto& entry : manifest_)
      log.info("  {:<26} = {:<13} v{:<6} {}", entry.config_key, entry.plugin->name(), entry.plugin->descriptor->version,
               entry.plugin->file.string());
    log.info("resolved config (saved to {}/config.toml):\n{}", summary.run_dir, resolved);
    int64_t count = 0;
    for (const auto& parameter : parameters_) count += parameter.tensor.numel();
    log.info("model: {} parameters, {} MoE layers of {}; data: {} tokens ({} train) from {}", count,
             model_->num_moe_layers(), model_->dims().num_layers, dataset_->size(), train_end_, config_.data_path);
  }
  std::ofstream metrics(summary.run_dir + "/metrics.jsonl");
  std::mt19937_64 generator(config_.seed);

  const int64_t tokens_per_step = config_.batch_size * config_.micro_batches * config_.seq_len;
  double lr = 0, smoothed = 0, window_tokens = 0;
  std::vector<at::Tensor> step_load;  // per MoE layer, this step's tokens_per_expert
  auto start = std::chrono::steady_clock::now();
  auto window_start = start;

  StepFunctions step_functions;
  step_functions.micro_batches = config_.micro_batches;
  step_functions.forward = [&](int64_t) {
    at::Tensor tokens = dataset_->sample(config_.batch_size, config_.seq_len + 1, 0, train_end_, generator);
    ModelOutput output = model_->forward(tokens);
    for (size_t layer = 0; layer < output.tokens_per_expert.size(); ++layer) {
      if (step_load.size() <= layer) step_load.push_back(at::zeros_like(output.tokens_per_expert[layer]));
      step_load[layer] += output.tokens_per_expert[layer];
    }
    return MicroBatchLoss{output.loss, output.cross_entropy.item<double>(), output.aux_loss.item<double>(),
                          config_.batch_size * config_.seq_len};
  };
  step_functions.zero_grad = [&] {
    for (auto& parameter : parameters_) parameter.tensor.mutable_grad() = at::Tensor();
  };
  step_functions.clip_gradients = [&] {
    std::vector<at::Tensor> norms;
    for (auto& parameter : parameters_)
      if (parameter.tensor.grad().defined()) norms.push_back(parameter.tensor.grad().to(at::kFloat).norm());
    double total = norms.empty() ? 0.0 : at::stack(norms).norm().item<double>();
    if (config_.grad_clip > 0 && total > config_.grad_clip) {
      at::NoGradGuard no_grad;
      for (auto& parameter : parameters_)
        if (parameter.tensor.grad().defined()) parameter.tensor.mutable_grad().mul_(config_.grad_clip / (total + 1e-6));
    }
    return total;
  };
  step_functions.optimizer_step = [&] { optimizer_->step(lr); };
  step_functions.after_optimizer_step = [&] { model_->after_optimizer_step(); };

  for (int64_t step = 1; step <= config_.steps; ++step) {
    lr = learning_rate(config_, step);
    step_load.clear();
    StepResult result = schedule_->run_step(step_functions);
    if (!std::isfinite(result.loss))
      throw Error("loss became " + std::to_string(result.loss) + " at step " + std::to_string(step) +
                  "; lower train.lr or set train.grad_clip (see " + summary.run_dir + "/metrics.jsonl)");
    window_tokens += static_cast<double>(tokens_per_step);
    smoothed = step == 1 ? result.cross_entropy : 0.9 * smoothed + 0.1 * result.cross_entropy;
    if (step == 1) summary.first_loss = result.cross_entropy;
    if (step % config_.log_every == 0 || step == 1 || step == config_.steps) {
      auto now = std::chrono::steady_clock::now();
      double seconds = std::chrono::duration<double>(now - window_start).count();
      double tokens_per_second = window_tokens / std::max(seconds, 1e-9);
      window_start = now;
      window_tokens = 0;
      double imbalance = 0;
      std::ostringstream router_json;
      router_json << "[";
      for (size_t layer = 0; layer < step_load.size(); ++layer) {
        double ratio = max_over_mean(step_load[layer]);
        imbalance = std::max(imbalance, ratio);
        at::Tensor counts = step_load[layer].to(at::kLong).contiguous();
        router_json << (layer ? "," : "") << "{\"moe_layer\":" << layer << ",\"max_over_mean\":" << ratio
                    << ",\"tokens_per_expert\":[";
        for (int64_t e = 0; e < counts.numel(); ++e) router_json << (e ? "," : "") << counts.data_ptr<int64_t>()[e];
        router_json << "]}";
      }
      router_json << "]";
      metrics << std::setprecision(6) << "{\"step\":" << step << ",\"loss\":" << result.loss
              << ",\"cross_entropy\":" << result.cross_entropy << ",\"aux_loss\":" << result.aux_loss
              << ",\"lr\":" << lr << ",\"grad_norm\":" << result.grad_norm << ",\"tokens_per_s\":" << tokens_per_second
              << ",\"router\":" << router_json.str() << "}\n";
      metrics.flush();
      if (!settings_.quiet)
        log.info("step {:>5}/{} | loss {:.4f} (smoothed {:.4f}) | aux {:.4f} | lr {:.2e} | grad norm {:.3f} | "
                 "{:.0f} tok/s | router max/mean load {:.2f}",
                 step, config_.steps, result.cross_entropy, smoothed, result.aux_loss, lr, result.grad_norm,
                 tokens_per_second, imbalance);
    }
  }
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  summary.steps = config_.steps;
  summary.final_smoothed_loss = smoothed;
  summary.tokens_per_second = static_cast<double>(tokens_per_step * config_.steps) / summary.seconds;
  summary.validation_loss = evaluate();
  save_safetensors(summary.run_dir + "/model.safetensors", model_->state());
  if (!settings_.quiet) {
    log.info("done: {} steps in {:.1f} s ({:.0f} tok/s); loss {:.4f} at step 1 -> {:.4f} smoothed at the end; "
             "validation loss {:.4f}",
             summary.steps, summary.seconds, summary.tokens_per_second, summary.first_loss,
             summary.final_smoothed_loss, summary.validation_loss);
    log.info("outputs: {0}/config.toml, {0}/metrics.jsonl, {0}/model.safetensors", summary.run_dir);
  }
  return summary;
}

void save_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors) {
  std::ostringstream header;
  header << "{\"__metadata__\":{\"format\":\"pt\",\"producer\":\"pithtrain\"}";
  std::vector<at::Tensor> contiguous;
  uint64_t offset = 0;
  for (const auto& item : tensors) {
    at::Tensor tensor = item.tensor.detach().to(at::kCPU).contiguous();
    const char* dtype = tensor.scalar_type() == at::kFloat    ? "F32"
                        : tensor.scalar_type() == at::kDouble ? "F64"
                        : tensor.scalar_type() == at::kBFloat16 ? "BF16"
                        : tensor.scalar_type() == at::kLong   ? "I64"
                                                              : nullptr;
    if (dtype == nullptr) throw Error("save_safetensors: tensor " + item.name + " has an unsupported dtype");
    uint64_t bytes = tensor.numel() * tensor.element_size();
    header << ",\"" << item.name << "\":{\"dtype\":\"" << dtype << "\",\"shape\":[";
    for (int64_t d = 0; d < tensor.dim(); ++d) header << (d ? "," : "") << tensor.size(d);
    header << "],\"data_offsets\":[" << offset << "," << offset + bytes << "]}";
    offset += bytes;
    contiguous.push_back(tensor);
  }
  header << "}";
  std::string header_text = header.str();
  while (header_text.size() % 8 != 0) header_text += ' ';
  const std::string temporary = path + ".tmp";
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    uint64_t header_size = header_text.size();
    out.write(reinterpret_cast<const char*>(&header_size), 8);
    out.write(header_text.data(), static_cast<std::streamsize>(header_text.size()));
    for (const auto& tensor : contiguous)
      out.write(static_cast<const char*>(tensor.data_ptr()), static_cast<std::streamsize>(tensor.numel() * tensor.element_size()));
    if (!out) throw Error("writing '" + temporary + "' failed (disk full?)");
  }
  fs::rename(temporary, path);
}

}  // namespace pithtrain
