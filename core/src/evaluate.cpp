// Validation: the mean cross-entropy over the same held-out windows every time, on every layout; and
// the scoring `pithtrain eval` does with a run's saved weights.
#include <algorithm>
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "pithtrain/error.h"
#include "trainer.h"

namespace pithtrain {

std::vector<uint64_t> Trainer::validation_offsets(uint64_t batch, uint64_t micro_batch) const {
  // The same held-out windows, evenly spread, every time: validation losses compare across a run. A
  // batch is a global batch (batch_size x micro_batches x ranks windows) split as in training, so every
  // layout evaluates the same windows; the mean over equal pieces is the mean over all of them.
  const uint64_t held_out = dataset_->size() - train_end_;
  const uint64_t seq_len = static_cast<uint64_t>(config_.seq_len);
  const uint64_t per_rank = static_cast<uint64_t>(config_.batch_size), micro_batches = static_cast<uint64_t>(config_.micro_batches);
  const uint64_t ranks = static_cast<uint64_t>(config_.data_parallel);  // context ranks share the windows
  const uint64_t rank = groups_.data ? static_cast<uint64_t>(groups_.data->rank() / config_.context_parallel) : 0;
  const uint64_t global = per_rank * micro_batches * ranks;
  const uint64_t available = (held_out - 1) / seq_len;
  const uint64_t wanted = static_cast<uint64_t>(config_.eval_batches) * global;
  std::vector<uint64_t> offsets;
  for (uint64_t row = 0; row < per_rank; ++row) {
    const uint64_t window = batch * global + (micro_batch * ranks + rank) * per_rank + row;
    offsets.push_back(train_end_ + (window * available / wanted) % available * seq_len);
  }
  return offsets;
}

double Trainer::evaluate() {
  const uint64_t held_out = dataset_->size() - train_end_;
  const uint64_t seq_len = static_cast<uint64_t>(config_.seq_len);
  if (config_.eval_batches < 1 || held_out < seq_len + 1) return std::nan("");
  at::NoGradGuard no_grad;
  const uint64_t micro_batches = static_cast<uint64_t>(config_.micro_batches);
  double total = 0;
  for (uint64_t batch = 0; batch < static_cast<uint64_t>(config_.eval_batches); ++batch)
    for (uint64_t micro_batch = 0; micro_batch < micro_batches; ++micro_batch) {
      const std::vector<uint64_t> offsets = validation_offsets(batch, micro_batch);
      at::Tensor tokens = dataset_->windows(offsets, config_.seq_len + 1);
      if (!groups_.pipeline) {
        total += forward_gathered(tokens).cross_entropy.item<double>();
        continue;
      }
      // Pipeline: the chain's pieces in order, each on its stage, the activation passed from stage to
      // stage; the last piece's stage has the loss.
      const int64_t stage = groups_.pipeline->rank();
      const int64_t tag = 1000000 + static_cast<int64_t>(batch * micro_batches + micro_batch);
      const std::vector<int64_t> shape = {config_.batch_size, config_.seq_len / config_.context_parallel, model_->dims().hidden_size};
      const int64_t pieces = static_cast<int64_t>(stages_.piece_units.size()), stages = groups_.pipeline->size();
      auto owner = [&](int64_t piece) { return stages_.owner(piece, stages); };
      at::Tensor x;
      ModelOutput scratch;
      for (int64_t piece = 0; piece < pieces; ++piece) {
        if (owner(piece) != stage) continue;
        if (piece > 0 && owner(piece - 1) != stage)
          x = groups_.pipeline->receive(shape, config_.dtype == "bfloat16" ? at::kBFloat16 : at::kFloat, owner(piece - 1), tag);
        for (int64_t unit = stages_.piece_units[piece].first; unit < stages_.piece_units[piece].second; ++unit)
          x = model_->forward_unit(unit, x, tokens, scratch).output;
        if (piece + 1 == pieces) total += x.item<double>();
        else if (owner(piece + 1) != stage) groups_.pipeline->start_send(x.contiguous(), owner(piece + 1), tag)->wait();
      }
    }
  total /= static_cast<double>(config_.eval_batches * micro_batches);
  if (groups_.pipeline) {  // the loss is the last piece's stage's
    std::vector<at::Tensor> sum = {at::tensor({total}, at::kDouble)};
    groups_.pipeline->all_reduce_sum(sum);
    total = sum[0].item<double>();
  }
  if (groups_.data) {
    std::vector<at::Tensor> sum = {at::tensor({total}, at::kDouble)};
    groups_.data->all_reduce_sum(sum);
    total = sum[0].item<double>() / static_cast<double>(groups_.data->size());
  }
  return total;
}

EvalFigures Trainer::evaluate_weights(const std::string& weights, bool validation_split) {
  state_->init_from(weights);
  EvalFigures figures;
  figures.bytes_known = dataset_->header().tokenizer == 1;  // bytes: a target below 256 is one byte of text
  const uint64_t seq_len = static_cast<uint64_t>(config_.seq_len);
  auto count = [&](const std::vector<uint64_t>& offsets) {
    for (const uint64_t offset : offsets) {
      ++figures.windows;
      for (uint64_t i = 1; i <= seq_len; ++i) figures.bytes += dataset_->token(offset + i) < 256;
    }
    figures.targets += offsets.size() * seq_len;
  };
  if (validation_split) {
    // evaluate() itself, so the number is the run's validation loss for the same weights.
    figures.loss = evaluate();
    if (std::isnan(figures.loss))
      throw Error("'" + config_.data_path + "' has no validation window: its held-out tail (data.validation_fraction = " +
                  std::to_string(config_.validation_fraction) + ") is shorter than train.seq_len + 1 = " + std::to_string(seq_len + 1) +
                  " tokens, or eval.batches = 0; evaluate the whole file instead (--split all)");
    for (uint64_t batch = 0; batch < static_cast<uint64_t>(config_.eval_batches); ++batch)
      for (uint64_t micro_batch = 0; micro_batch < static_cast<uint64_t>(config_.micro_batches); ++micro_batch)
        count(validation_offsets(batch, micro_batch));
    return figures;
  }
  const uint64_t available = (dataset_->size() - 1) / seq_len;  // a last stretch shorter than a window is left out
  at::NoGradGuard no_grad;
  double total = 0;  // sum over windows of each window's mean cross-entropy (all windows are equally long)
  for (uint64_t first = 0; first < available; first += static_cast<uint64_t>(config_.batch_size)) {
    std::vector<uint64_t> offsets;
    for (uint64_t window = first; window < std::min(available, first + config_.batch_size); ++window) offsets.push_back(window * seq_len);
    total += forward_gathered(dataset_->windows(offsets, config_.seq_len + 1)).cross_entropy.item<double>() * offsets.size();
    count(offsets);
  }
  figures.loss = total / static_cast<double>(available);
  return figures;
}

ModelOutput Trainer::forward_gathered(const at::Tensor& tokens) {
  return model_->forward(tokens, [this](int64_t unit) { schedule_->gather_unit(unit); },
                         [this](int64_t unit) { schedule_->release_unit(unit); });
}

}  // namespace pithtrain
