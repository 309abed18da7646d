// Trainer's constructor: every component built from the config, in the order a run needs them, and
// every check on bad input made before the first step.
#include <filesystem>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <spdlog/spdlog.h>

#include "trainer.h"

namespace pithtrain {
namespace fs = std::filesystem;

Trainer::Trainer(Options config, RunSettings settings) : options_(std::move(config)), settings_(std::move(settings)) {
  // The mesh (docs/distributed.md), checked against the process count before any process group exists.
  const auto environment = process_environment();
  const int64_t processes = environment ? environment->world_size : 1;
  config_ = read_train_config(options_, processes);
  Options train = options_.table("train"), parallel = options_.table("parallel");
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
    // Every [model] key and plugin table is checked before the ranks meet: the same model on the meta
    // device (shapes only, no memory), as `pithtrain explain` builds it.
    PluginContext dry_run;
    dry_run.device = c10::Device(c10::kMeta);
    dry_run.dtype = config_.dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
    dry_run.logger = &logger();
    dry_run.dims.seq_len = config_.seq_len / config_.context_parallel;
    Model(options_.table("model"), *registry_, dry_run);
    groups_ = connect(*environment, config_.device, config_.collective_timeout_seconds, config_.expert_parallel,
                      config_.pipeline_parallel, config_.context_parallel);
    if (groups_.world->rank() > 0) settings_.quiet = true;  // rank 0 reports; the others only warn
  }
  at::manual_seed(config_.seed);
  PluginContext context;
  context.communicator = groups_.data;
  context.expert_group = groups_.expert;
  context.pipeline_group = groups_.pipeline;
  context.context_group = groups_.context;
  context.device = c10::Device(config_.device);
  context.dtype = config_.dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
  context.logger = &logger();
  // Sequence-wise router losses need the sequence boundaries: this rank's tokens of each sequence.
  context.dims.seq_len = config_.seq_len / config_.context_parallel;
  model_ = std::make_unique<Model>(options_.table("model"), *registry_, context);
  model_->set_loss_chunk_tokens(config_.loss_chunk_tokens);
  if (groups_.context) {
    model_->set_context_split(groups_.context->rank(), groups_.context->size());
    const auto [plugin, key] = model_->attention_without_context_parallel();
    if (!plugin.empty())
      throw Error(parallel.where("context") + ": parallel.context = " + std::to_string(config_.context_parallel) +
                  " but attention plugin '" + plugin + "' does not split sequences over ranks (" + key +
                  ", Attention::supports_context_parallel); use \"gqa\" or parallel.context = 1");
  }
  manifest_ = model_->manifest();
  // bf16 compute keeps float32 master weights: the optimizer updates them, the model gets bf16 copies.
  weights_ = make_master_weights(model_->parameters(), context.dtype != at::kFloat);
  std::map<std::string, std::vector<int64_t>> expert_blocks;  // parameter name -> its block's shape
  for (const auto& parameter : weights_.model)
    if (parameter.expert_sharded) expert_blocks.emplace(parameter.name, parameter.tensor.sizes().vec());
  if (config_.expert_parallel > 1 && model_->num_moe_layers() > 0 && expert_blocks.empty())
    throw Error(parallel.where("expert") + ": parallel.expert = " + std::to_string(config_.expert_parallel) +
                " but the experts plugin '" + options_.table("model").table("moe").table("experts").text("plugin", "grouped") +
                "' keeps every expert on every rank; set model.moe.experts.plugin = \"ep_alltoall\"");
  // train.freeze: parameters whose names match a pattern keep their values (fine-tuning).
  std::vector<Parameter> trainable = apply_freeze(weights_, config_.freeze, train.where("freeze"), frozen_);

  flops_per_token_ = model_->flops_per_token(config_.seq_len);
  Options optimizer_options = options_.table("optimizer");
  const LoadedPlugin& optimizer_plugin = registry_->get("optimizer", optimizer_options.text("plugin", "adamw"), optimizer_options.where("plugin"));
  PluginContext optimizer_context = context;
  optimizer_context.dtype = at::kFloat;
  optimizer_context.dims = model_->dims();
  optimizer_context.parameters = trainable;
  Options schedule_options = options_.table("schedule");
  const LoadedPlugin& schedule_plugin = registry_->get("schedule", schedule_options.text("plugin", "single"), schedule_options.where("plugin"));
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
  if (model_->mtp_layers() > 0) {
    // Multi-token prediction runs with the head but needs the embedding of the next tokens (the first unit) and
    // every position of a sequence: refused, by name, where a unit-by-unit, sharded or split model is untested.
    const std::string where = options_.table("model").where("mtp_layers");
    auto refuse = [&](bool refused, const std::string& what, const std::string& fix) {
      if (refused)
        throw Error(where + ": model.mtp_layers = " + std::to_string(model_->mtp_layers()) + " (multi-token prediction) with " + what +
                    " is not supported: its layers sit with the LM head but read the embedding; " + fix);
    };
    refuse(config_.pipeline_parallel > 1, "parallel.pipeline = " + std::to_string(config_.pipeline_parallel),
           "use parallel.pipeline = 1 or model.mtp_layers = 0");
    refuse(config_.context_parallel > 1, "parallel.context = " + std::to_string(config_.context_parallel),
           "use parallel.context = 1 or model.mtp_layers = 0");
    refuse(config_.expert_parallel > 1, "parallel.expert = " + std::to_string(config_.expert_parallel),
           "use parallel.expert = 1 or model.mtp_layers = 0");
    refuse(schedule_plugin.name() != "single" && schedule_plugin.name() != "data_parallel",
           "schedule '" + schedule_plugin.name() + "' (" + schedule_options.where("plugin") + ")",
           "use schedule.plugin = \"single\" or \"data_parallel\", or model.mtp_layers = 0");
    refuse(config_.seq_len <= model_->mtp_layers(), "train.seq_len = " + std::to_string(config_.seq_len),
           "depth k needs positions with a token k + 1 ahead: raise train.seq_len");
  }
  stages_ = plan_stages(parallel, *model_, weights_.model, config_, schedule_->chunks_per_stage(),
                        groups_.pipeline ? groups_.pipeline->rank() : 0, settings_.quiet);
  parameter_groups_ = count_parameter_groups(weights_.model, frozen_);

  // A fully sharded schedule hands back one flat shard per trainable parameter: the optimizer and the
  // checkpoints see those, the schedule owns the full tensors.
  std::vector<std::vector<Parameter>> trainable_by_unit(model_->num_units());
  for (const auto& parameter : trainable) trainable_by_unit[model_->unit_of(parameter.name)].push_back(parameter);
  std::map<std::string, std::vector<int64_t>> full_shapes;  // read before a schedule frees the full tensors
  for (const auto& parameter : trainable) full_shapes[parameter.name] = parameter.tensor.sizes().vec();
  std::map<std::string, std::vector<int64_t>> flat_full_shapes;  // the sharded ones
  if (std::vector<Parameter> shards = schedule_->shard(trainable_by_unit); !shards.empty()) {
    std::map<std::string, Parameter> by_name;
    for (auto& shard : shards) by_name[shard.name] = shard;
    for (auto& parameter : trainable) {
      auto found = by_name.find(parameter.name);
      if (found == by_name.end())
        throw Error("schedule '" + schedule_plugin.name() + "' returned no shard for parameter '" + parameter.name + "'");
      for (auto& master : weights_.master)
        if (master.name == parameter.name) master.tensor = found->second.tensor;
      flat_full_shapes[parameter.name] = full_shapes.at(parameter.name);
      parameter.tensor = found->second.tensor;
    }
    optimizer_context.parameters = trainable;
  }
  optimizer_ = make_optimizer(optimizer_plugin, optimizer_options, optimizer_context);
  manifest_.push_back({"optimizer.plugin", &optimizer_plugin});
  manifest_.push_back({"schedule.plugin", &schedule_plugin});
  state_ = std::make_unique<RunState>(*model_, *optimizer_, weights_, trainable, expert_blocks, flat_full_shapes, frozen_,
                                      groups_, stages_);

  options_.check_unknown_keys();

  dataset_ = std::make_unique<TokenDataset>(config_.data_path);
  if (static_cast<int64_t>(dataset_->header().vocab_size) > model_->dims().vocab_size)
    throw Error(options_.table("model").where("vocab_size") + ": model.vocab_size is " +
                std::to_string(model_->dims().vocab_size) + " but dataset '" + config_.data_path + "' has tokens up to " +
                std::to_string(dataset_->header().vocab_size) + "; raise model.vocab_size");
  train_end_ = static_cast<uint64_t>(std::llround(dataset_->size() * (1.0 - config_.validation_fraction)));
  if (train_end_ < static_cast<uint64_t>(config_.seq_len + 1))
    throw Error(options_.table("data").where("path") + ": data.path '" + config_.data_path + "' holds " +
                std::to_string(dataset_->size()) + " tokens, " + std::to_string(train_end_) + " of them for training: too few " +
                "for one window of train.seq_len + 1 = " + std::to_string(config_.seq_len + 1) + " tokens; use more data " +
                "or a shorter train.seq_len");
  train_order_ = std::make_unique<WindowOrder>(0, train_end_, config_.seq_len + 1, config_.seed);
  run_dir_ = settings_.out_dir.empty() ? "runs/" + config_.run_name : settings_.out_dir;
  base_dir_ = run_dir_;
  checkpoint_dir_ = (fs::path(run_dir_) / "checkpoints").string();
  if (settings_.move_aside && groups_.world)
    throw Error("--move-aside with " + std::to_string(processes) + " processes: move the old run in " + run_dir_ +
                " aside with one process first (or yourself), or use --out NEW_DIR");
  // Other ranks keep their own config, log and metrics below the run directory; checkpoints and the
  // final weights are rank 0's (all ranks hold the same state).
  if (groups_.world && groups_.world->rank() > 0) run_dir_ += "/rank_" + std::to_string(groups_.world->rank());
}

}  // namespace pithtrain
