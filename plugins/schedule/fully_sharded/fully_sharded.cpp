// FullyShardedSchedule (ZeRO-3): each rank keeps 1/N of every trainable parameter, so 1/N of the
// gradients and of the optimizer state too; a unit's full tensors exist only while that unit runs.
// The forward runs without a graph and keeps each unit's input; the backward recomputes one unit at a
// time with its gathered tensors, backpropagates it and reduce-scatters its gradients into the shards.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include <spdlog/spdlog.h>

#include "pithtrain/distributed.h"
#include "pithtrain/schedule.h"

namespace pithtrain {
namespace {

struct ShardedTensor {
  Parameter full;              // the model's tensor, owned by its plugin: emptied between uses
  at::Tensor shard;            // [shard_size] this rank's elements; the optimizer updates it
  std::vector<int64_t> shape;  // of the full tensor
  int64_t numel = 0, shard_size = 0;
};

class FullyShardedSchedule final : public Schedule {
 public:
  FullyShardedSchedule(Options& /*options*/, const PluginContext& context) : group_(context.communicator), log_(context.logger) {
    ranks_ = group_ ? group_->size() : 1;
    rank_ = group_ ? group_->rank() : 0;
  }

  bool reduces_gradients() const override { return true; }

  std::vector<Parameter> shard(const std::vector<std::vector<Parameter>>& parameters_by_unit) override {
    at::NoGradGuard no_grad;
    units_.assign(parameters_by_unit.size(), {});
    std::vector<Parameter> shards;
    int64_t full_elements = 0, kept_elements = 0, largest_unit = 0;
    for (size_t unit = 0; unit < parameters_by_unit.size(); ++unit) {
      int64_t unit_elements = 0;
      for (const Parameter& parameter : parameters_by_unit[unit]) {
        if (parameter.expert_sharded)
          throw Error("schedule 'fully_sharded': parameter '" + parameter.name + "' is an expert-parallel block; " +
                      "fully_sharded shards every parameter over all ranks itself: set parallel.expert = 1 and " +
                      "model.moe.experts.plugin = \"grouped\", or use schedule 'data_parallel' with expert parallelism");
        if (!parameter.tensor.requires_grad())
          throw Error("schedule 'fully_sharded': parameter '" + parameter.name + "' gets no gradient of its own (a " +
                      "float32 master copy of a bfloat16 model); use it with train.dtype = \"float32\", or schedule 'single'");
        ShardedTensor entry;
        entry.full = parameter;
        entry.shape = parameter.tensor.sizes().vec();
        entry.numel = parameter.tensor.numel();
        entry.shard_size = (entry.numel + ranks_ - 1) / ranks_;
        at::Tensor padded = at::zeros({entry.shard_size * ranks_}, parameter.tensor.options());
        padded.narrow(0, 0, entry.numel).copy_(parameter.tensor.detach().reshape(-1));
        entry.shard = padded.narrow(0, rank_ * entry.shard_size, entry.shard_size).clone().requires_grad_(true);
        shards.push_back({parameter.name, entry.shard, parameter.weight_decay, false});
        full_elements += entry.numel;
        kept_elements += entry.shard_size;
        unit_elements += entry.numel;
        units_[unit].push_back(std::move(entry));
      }
      largest_unit = std::max(largest_unit, unit_elements);
      release_unit(static_cast<int64_t>(unit));
    }
    if (log_ != nullptr && rank_ == 0)
      log_->info("schedule fully_sharded: each of {} rank(s) keeps {} of {} trainable parameter elements ({:.1f}%) with "
                 "their gradients and optimizer state; the largest unit gathers {:.2f} MiB while it runs",
                 ranks_, kept_elements, full_elements, 100.0 * kept_elements / std::max<int64_t>(full_elements, 1),
                 largest_unit * 4.0 / (1024 * 1024));
    return shards;
  }

  // One all-gather of the unit's shards, then every full tensor takes its part.
  void gather_unit(int64_t unit) override {
    if (unit < 0 || unit >= static_cast<int64_t>(units_.size()) || units_[unit].empty()) return;
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> local;
    int64_t total = 0;
    for (const auto& entry : units_[unit]) local.push_back(entry.shard.detach()), total += entry.shard_size;
    at::Tensor mine = at::cat(local);                                  // [total]
    at::Tensor all = group_ ? group_->all_gather(mine) : mine;         // [ranks * total], rank-major
    at::Tensor by_rank = all.view({ranks_, total});
    int64_t offset = 0;
    for (auto& entry : units_[unit]) {
      at::Tensor flat = by_rank.narrow(1, offset, entry.shard_size).reshape(-1);  // [ranks * shard_size]
      entry.full.tensor.set_data(flat.narrow(0, 0, entry.numel).view(entry.shape));
      offset += entry.shard_size;
    }
  }

  void release_unit(int64_t unit) override {
    if (unit < 0 || unit >= static_cast<int64_t>(units_.size())) return;
    for (auto& entry : units_[unit]) {
      entry.full.tensor.set_data(at::empty({0}, entry.full.tensor.options()));
      entry.full.tensor.mutable_grad() = at::Tensor();
    }
  }

  StepResult run_step(const StepFunctions& step) override {
    if (step.units < 1 || !step.forward_unit)
      throw Error("schedule 'fully_sharded' needs the model as a chain of units (StepFunctions::forward_unit)");
    StepResult result;
    step.zero_grad();
    const double scale = 1.0 / static_cast<double>(step.micro_batches);
    for (int64_t micro_batch = 0; micro_batch < step.micro_batches; ++micro_batch) {
      // Forward without a graph: each unit's input is all that is kept.
      std::vector<at::Tensor> inputs(step.units);
      at::Tensor x;
      double aux_loss = 0;
      {
        at::NoGradGuard no_grad;
        for (int64_t unit = 0; unit < step.units; ++unit) {
          gather_unit(unit);
          inputs[unit] = x;
          UnitOutput output = step.forward_unit(unit, micro_batch, x);
          release_unit(unit);
          x = output.output;
          if (output.aux_loss.defined()) aux_loss += output.aux_loss.item<double>();
        }
      }
      const double cross_entropy = x.item<double>();
      // Backward, last unit first: recompute it with a graph, backpropagate the gradient of its output
      // (from the unit after it) and of its aux_loss, reduce-scatter its gradients, free it.
      at::Tensor output_grad;
      for (int64_t unit = step.units - 1; unit >= 0; --unit) {
        gather_unit(unit);
        at::Tensor input = inputs[unit].defined() ? inputs[unit].detach().requires_grad_(true) : at::Tensor();
        inputs[unit] = at::Tensor();
        UnitOutput output = step.forward_unit(unit, micro_batch, input);
        std::vector<at::Tensor> roots, grads;
        if (output.output.requires_grad())
          roots.push_back(output.output),
              grads.push_back(unit == step.units - 1 ? at::full_like(output.output, scale) : output_grad);
        if (output.aux_loss.defined() && output.aux_loss.requires_grad())
          roots.push_back(output.aux_loss), grads.push_back(at::full_like(output.aux_loss, scale));
        if (!roots.empty()) torch::autograd::backward(roots, grads);
        if (input.defined()) output_grad = input.grad().defined() ? input.grad() : at::zeros_like(input);
        reduce_unit(unit);
        release_unit(unit);
      }
      result.loss += (cross_entropy + aux_loss) * scale;
      result.cross_entropy += cross_entropy * scale;
      result.aux_loss += aux_loss * scale;
      result.tokens += step.tokens_per_micro_batch;
    }
    result.grad_norm = step.clip_gradients();
    step.optimizer_step();
    step.after_optimizer_step();
    return result;
  }

 private:
  // The unit's gradients, padded and laid out rank-major in one buffer, summed over the ranks; each
  // rank adds the mean of its part to its shards' gradients.
  void reduce_unit(int64_t unit) {
    if (units_[unit].empty()) return;
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> parts;  // each [ranks, shard_size]
    int64_t total = 0;
    for (const auto& entry : units_[unit]) {
      at::Tensor padded = at::zeros({entry.shard_size * ranks_}, entry.shard.options());
      if (entry.full.tensor.grad().defined()) padded.narrow(0, 0, entry.numel).copy_(entry.full.tensor.grad().reshape(-1));
      parts.push_back(padded.view({ranks_, entry.shard_size}));
      total += entry.shard_size;
    }
    at::Tensor buffer = at::cat(parts, 1).reshape(-1);                     // [ranks * total]
    at::Tensor mine = group_ ? group_->reduce_scatter_sum(buffer) : buffer;  // [total]
    mine.div_(static_cast<double>(ranks_));
    int64_t offset = 0;
    for (auto& entry : units_[unit]) {
      at::Tensor part = mine.narrow(0, offset, entry.shard_size);
      at::Tensor& grad = entry.shard.mutable_grad();
      grad = grad.defined() ? grad + part : part.clone();
      offset += entry.shard_size;
    }
  }

  std::shared_ptr<Communicator> group_;
  spdlog::logger* log_ = nullptr;
  int64_t ranks_ = 1, rank_ = 0;
  std::vector<std::vector<ShardedTensor>> units_;  // by unit, the sharded parameters it uses
};

}  // namespace

std::unique_ptr<Schedule> make_fully_sharded_schedule(Options& options, const PluginContext& context) {
  return std::make_unique<FullyShardedSchedule>(options, context);
}

}  // namespace pithtrain
