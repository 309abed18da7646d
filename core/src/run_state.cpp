// The run state (run_state.h): checkpoint entries per parallel layout, gathering and narrowing, resume.
#include "run_state.h"

#include <sstream>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>

#include "pithtrain/error.h"

namespace pithtrain {

namespace {

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

}  // namespace

RunState::RunState(Model& model, Optimizer& optimizer, MasterWeights& weights, const std::vector<Parameter>& trainable,
                   const std::map<std::string, std::vector<int64_t>>& expert_blocks,
                   const std::map<std::string, std::vector<int64_t>>& flat_full_shapes, const std::set<std::string>& frozen,
                   const ProcessGroups& groups, const StagePlan& plan)
    : model_(model), optimizer_(optimizer), weights_(weights), groups_(groups), plan_(plan) {
  for (const auto& [name, shape] : expert_blocks) sharded_entries_.insert("model/" + name);
  std::map<std::string, std::vector<int64_t>> shard_shapes;  // parameter name -> its flat shard's shape
  for (const auto& parameter : trainable)
    if (auto full = flat_full_shapes.find(parameter.name); full != flat_full_shapes.end()) {
      flat_shards_["model/" + parameter.name] = full->second;
      shard_shapes[parameter.name] = parameter.tensor.sizes().vec();
    }
  // Optimizer state of an expert block or a flat shard (named "<parameter>.<what>", the block's or the
  // shard's shape) is a block or a shard too.
  for (const auto& item : optimizer_.state()) {
    for (const auto& [name, shape] : expert_blocks)
      if (item.name.rfind(name + ".", 0) == 0 && item.tensor.sizes() == at::IntArrayRef(shape))
        sharded_entries_.insert("optimizer/" + item.name);
    for (const auto& [name, shape] : shard_shapes)
      if (item.name.rfind(name + ".", 0) == 0 && item.tensor.sizes() == at::IntArrayRef(shape))
        flat_shards_["optimizer/" + item.name] = flat_shards_.at("model/" + name);
  }
  if (groups_.pipeline) {
    // A stage keeps only its units' trainable parameters and their optimizer state; the others are
    // emptied (their shapes kept for checkpoints, which gather every stage's tensors).
    at::NoGradGuard no_grad;
    auto away = [&](const std::string& entry, const at::Tensor& tensor) {
      away_shapes_[entry] = tensor.sizes().vec();
      tensor.set_data(at::empty({0}, tensor.options()));
    };
    // Optimizer state of a parameter is named "<parameter>.<what>" (as for expert blocks above).
    for (const auto& item : optimizer_.state())
      for (const auto& parameter : trainable)
        if (!plan_.owned.count(parameter.name) && item.name.rfind(parameter.name + ".", 0) == 0) {
          away("optimizer/" + item.name, item.tensor);
          break;
        }
    for (size_t index = 0; index < weights_.model.size(); ++index)
      if (!plan_.owned.count(weights_.model[index].name) && !frozen.count(weights_.model[index].name)) {
        away("model/" + weights_.master[index].name, weights_.master[index].tensor);
        if (weights_.mixed_precision) weights_.model[index].tensor.set_data(at::empty({0}, weights_.model[index].tensor.options()));
      }
  }

}

std::vector<NamedTensor> RunState::tensors() const {
  std::vector<NamedTensor> tensors;
  for (const auto& parameter : weights_.master) tensors.push_back({"model/" + parameter.name, parameter.tensor});
  for (const auto& item : buffers()) tensors.push_back({"model/" + item.name, item.tensor});
  for (const auto& item : optimizer_.state()) tensors.push_back({"optimizer/" + item.name, item.tensor});
  tensors.push_back({"rng/cpu", at::detail::getDefaultCPUGenerator().get_state()});
  return tensors;
}

std::vector<NamedTensor> RunState::gathered(std::vector<NamedTensor> tensors, const std::string& entry_prefix) const {
  if (groups_.pipeline) {
    // Trainable parameters and their optimizer state live on the stage that trains them: every stage's
    // come together as a sum over the stages, with zeros for the ones kept elsewhere.
    std::vector<at::Tensor> shared;
    for (auto& item : tensors) {
      const std::string entry = entry_prefix + item.name;
      bool stage_tensor = away_shapes_.count(entry) > 0;
      if (auto shape = away_shapes_.find(entry); shape != away_shapes_.end())
        item.tensor = at::zeros(shape->second, item.tensor.options());
      else
        for (const auto& parameter : weights_.master)
          if (plan_.owned.count(parameter.name) && (entry == "model/" + parameter.name || entry.rfind("optimizer/" + parameter.name + ".", 0) == 0)) {
            stage_tensor = true;
            break;
          }
      if (!stage_tensor) continue;
      item.tensor = item.tensor.detach().clone();
      shared.push_back(item.tensor);
    }
    groups_.pipeline->all_reduce_sum(shared);
  }
  for (auto& item : tensors) {
    if (groups_.expert && sharded_entries_.count(entry_prefix + item.name))
      item.tensor = groups_.expert->all_gather(item.tensor.detach());
    if (auto shard = flat_shards_.find(entry_prefix + item.name); shard != flat_shards_.end()) {
      at::Tensor flat = groups_.data ? groups_.data->all_gather(item.tensor.detach()) : item.tensor.detach();
      item.tensor = flat.narrow(0, 0, c10::multiply_integers(shard->second)).view(shard->second);
    }
  }
  return tensors;
}

void RunState::load_tensors(const SafetensorsFile& file, const std::vector<NamedTensor>& targets, const std::string& entry_prefix,
                           const std::string& file_prefix, const std::string& path) const {
  std::set<std::string> blocks;
  for (const auto& entry : sharded_entries_)
    if (entry.rfind(entry_prefix, 0) == 0) blocks.insert(entry.substr(entry_prefix.size()));
  std::map<std::string, std::vector<int64_t>> shards;
  for (const auto& [entry, shape] : flat_shards_)
    if (entry.rfind(entry_prefix, 0) == 0) shards.emplace(entry.substr(entry_prefix.size()), shape);
  std::vector<NamedTensor> here;  // pipeline: the tensors this stage keeps
  for (const auto& target : targets)
    if (!away_shapes_.count(entry_prefix + target.name)) here.push_back(target);
  copy_tensors_by_name(file, here, file_prefix, path, blocks, groups_.expert ? groups_.expert->rank() : 0,
                       groups_.expert ? groups_.expert->size() : 1, shards, groups_.data ? groups_.data->rank() : 0,
                       groups_.data ? groups_.data->size() : 1);
}

std::vector<NamedTensor> RunState::buffers() const {
  std::vector<NamedTensor> result;
  for (const auto& item : model_.state())
    if (!weights_.is_parameter(item.name))
      result.push_back(item);
  return result;
}

double RunState::state_mb() const {
  // Tensors that stay between steps: what a sharded schedule divides. Gradients are counted where
  // they are kept (the master copies'; a bf16 model's own are transient).
  double bytes = 0;
  for (const auto& parameter : weights_.master) {
    bytes += static_cast<double>(parameter.tensor.nbytes());
    if (parameter.tensor.grad().defined()) bytes += static_cast<double>(parameter.tensor.grad().nbytes());
  }
  if (weights_.mixed_precision)
    for (const auto& parameter : weights_.model) bytes += static_cast<double>(parameter.tensor.nbytes());
  for (const auto& item : optimizer_.state()) bytes += static_cast<double>(item.tensor.nbytes());
  return bytes / (1024.0 * 1024.0);
}

std::vector<NamedTensor> RunState::final_weights() const {
  std::vector<NamedTensor> weights;
  for (const auto& parameter : weights_.master) weights.push_back({parameter.name, parameter.tensor});
  weights = gathered(std::move(weights), "model/");
  for (const auto& item : buffers()) weights.push_back(item);
  return weights;
}

std::map<std::string, std::string> RunState::metadata(int64_t step, uint64_t data_position, double smoothed,
                                                      const std::string& model_toml, const std::string& data_path,
                                                      const std::string& run_id) const {
  char smoothed_text[32];
  std::snprintf(smoothed_text, sizeof(smoothed_text), "%.17g", smoothed);
  return {{"step", std::to_string(step)},
          {"data_position", std::to_string(data_position)},
          {"smoothed_loss", smoothed_text},
          {"model_config", model_toml},
          {"data_path", data_path},
          {"run_id", run_id}};
}

void RunState::check_same_model(const std::filesystem::path& path, const SafetensorsFile& file, const std::string& model_toml,
                                const std::string& run_dir) {
  // Resuming another model's checkpoint would train the wrong thing; say so instead.
  auto saved = file.metadata.find("model_config");
  const std::string current = without_experts_plugin(model_toml);
  if (saved == file.metadata.end() || without_experts_plugin(saved->second) == current) return;
  std::istringstream before(without_experts_plugin(saved->second)), now(current);
  std::string line_before, line_now;
  while (std::getline(before, line_before) && std::getline(now, line_now) && line_before == line_now) {}
  throw Error("checkpoint '" + path.string() + "' was written for a different [model] config (it has '" + line_before +
              "', this run '" + line_now + "'); nothing was written; use a new --out (or --set run.name=NEW) for this " +
              "config, or --move-aside with --set checkpoint.resume=false to rename the old run in " + run_dir + " aside");
}

ResumePoint RunState::resume(const std::filesystem::path& path, const SafetensorsFile& file) {
  std::vector<NamedTensor> model_targets, optimizer_targets;
  for (auto& target : tensors()) {
    if (target.name.rfind("model/", 0) == 0) model_targets.push_back({target.name.substr(6), target.tensor});
    if (target.name.rfind("optimizer/", 0) == 0) optimizer_targets.push_back({target.name.substr(10), target.tensor});
  }
  load_tensors(file, model_targets, "model/", "model/", path.string());
  load_tensors(file, optimizer_targets, "optimizer/", "optimizer/", path.string());
  if (const at::Tensor* rng = file.find("rng/cpu")) {
    at::Generator generator = at::detail::getDefaultCPUGenerator();
    generator.set_state(*rng);
  }
  weights_.copy_master_to_model();
  return ResumePoint{path, std::stoll(file.metadata.at("step")), std::stoull(file.metadata.at("data_position")),
                     std::stod(file.metadata.at("smoothed_loss"))};
}

void RunState::init_from(const std::string& path) {
  // Initial weights (e.g. from `pithtrain convert import`): model.safetensors names, or a checkpoint's.
  SafetensorsFile file = load_safetensors(path);
  const std::string prefix = file.find("model/embedding.weight") ? "model/" : "";
  std::vector<NamedTensor> targets;
  for (const auto& parameter : weights_.master) targets.push_back({parameter.name, parameter.tensor});
  // Router buffers (e.g. the aux_free bias) come along when the file has them; new ones start at zero.
  for (const auto& item : buffers())
    if (file.find(prefix + item.name) != nullptr) targets.push_back(item);
  load_tensors(file, targets, "model/", prefix, path);
  weights_.copy_master_to_model();
}

}  // namespace pithtrain
