// Data-parallel gradient averaging, norms by parameter group, clipping (gradients.h).
#include "gradients.h"

#include <array>
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

namespace pithtrain {

double reduce_and_clip_gradients(MasterWeights& weights, const ProcessGroups& groups, const StagePlan& plan,
                                 const std::set<std::string>& frozen,
                                 const std::map<std::string, std::vector<int64_t>>& flat_shards,
                                 bool schedule_reduces_gradients, const ParameterGroups& parameter_groups, double grad_clip,
                                 std::map<std::string, double>& norms_by_group) {
  if (groups.data) {
    // Data parallel: the mean gradient over ranks (every trainable tensor, in one buffer). An expert
    // block already holds the gradients of every token of its expert group (the all-to-all's
    // backward brought them), so it is summed over the ranks holding the same block only.
    std::vector<at::Tensor> replicated, expert_blocks;
    for (auto& parameter : weights.model) {
      if (frozen.count(parameter.name) || flat_shards.count("model/" + parameter.name)) continue;
      if (groups.pipeline && !plan.owned.count(parameter.name)) continue;  // another stage trains it
      if (!parameter.tensor.grad().defined()) parameter.tensor.mutable_grad() = at::zeros_like(parameter.tensor);
      // A schedule that reduces gradients has already averaged the replicated ones.
      if (parameter.expert_sharded) expert_blocks.push_back(parameter.tensor.grad());
      else if (!schedule_reduces_gradients) replicated.push_back(parameter.tensor.grad());
    }
    groups.data->all_reduce_sum(replicated);
    if (groups.expert_data) groups.expert_data->all_reduce_sum(expert_blocks);
    for (auto* grads : {&replicated, &expert_blocks})
      for (auto& grad : *grads) grad.div_(static_cast<double>(groups.data->size()));
  }
  at::NoGradGuard no_grad;
  weights.gradients_to_master();
  // Squared norms by parameter group, replicated tensors, expert blocks and flat shards apart: the
  // blocks' are summed over the expert group and the shards' over all ranks, so every rank clips by
  // the norm of the whole model.
  enum { kReplicated, kExpertBlock, kFlatShard };
  std::map<std::string, std::array<double, 3>> squares;  // group -> squares of each kind
  // Under pipeline parallelism each stage has other groups: every rank lists them all, so the sums
  // over the stages line up.
  if (groups.pipeline)
    for (const auto& [group, counts] : parameter_groups)
      if (counts.first > 0) squares[group] = {0.0, 0.0, 0.0};
  std::vector<at::Tensor> parameter_squares;
  for (auto& parameter : weights.master)
    if (parameter.tensor.grad().defined()) parameter_squares.push_back(parameter.tensor.grad().to(at::kDouble).pow(2).sum());
  at::Tensor values = parameter_squares.empty() ? at::zeros({0}, at::kDouble) : at::stack(parameter_squares).cpu();  // one sync
  const double* value = values.data_ptr<double>();
  for (auto& parameter : weights.master) {
    if (!parameter.tensor.grad().defined()) continue;
    const int kind = parameter.expert_sharded ? kExpertBlock : flat_shards.count("model/" + parameter.name) ? kFlatShard : kReplicated;
    squares[parameter_group(parameter.name)][kind] += *value++;
  }
  for (auto [kind, group] : {std::pair{kExpertBlock, groups.expert.get()}, {kFlatShard, groups.data.get()}}) {
    if (group == nullptr || (kind == kFlatShard && flat_shards.empty())) continue;
    std::vector<at::Tensor> sums = {at::zeros({static_cast<int64_t>(squares.size())}, at::kDouble)};
    int64_t index = 0;
    for (const auto& [name, entry] : squares) sums[0][index++] = entry[kind];
    group->all_reduce_sum(sums);
    index = 0;
    for (auto& [name, entry] : squares) entry[kind] = sums[0][index++].item<double>();
  }
  if (groups.pipeline) {  // each stage's parameters are its own
    std::vector<at::Tensor> sums = {at::zeros({static_cast<int64_t>(squares.size()), 3}, at::kDouble)};
    int64_t index = 0;
    for (const auto& [name, entry] : squares) {
      for (int kind = 0; kind < 3; ++kind) sums[0][index][kind] = entry[kind];
      ++index;
    }
    groups.pipeline->all_reduce_sum(sums);
    index = 0;
    for (auto& [name, entry] : squares) {
      for (int kind = 0; kind < 3; ++kind) entry[kind] = sums[0][index][kind].item<double>();
      ++index;
    }
  }
  double total_square = 0;
  norms_by_group.clear();
  for (const auto& [group, entry] : squares) {
    const double square = entry[kReplicated] + entry[kExpertBlock] + entry[kFlatShard];
    norms_by_group[group] = std::sqrt(square);
    total_square += square;
  }
  const double total = std::sqrt(total_square);
  if (grad_clip > 0 && total > grad_clip)
    for (auto& parameter : weights.master)
      if (parameter.tensor.grad().defined()) parameter.tensor.mutable_grad().mul_(grad_clip / (total + 1e-6));
  return total;
}

}  // namespace pithtrain
