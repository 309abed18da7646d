// DataParallelSchedule: gradient accumulation whose last backward starts the all-reduce of each bucket
// of gradients as soon as the bucket is complete, so communication overlaps the rest of the backward.
#include <ATen/ATen.h>

#include <spdlog/spdlog.h>

#include "pithtrain/distributed.h"
#include "pithtrain/schedule.h"

namespace pithtrain {
namespace {

struct Bucket {
  std::vector<size_t> members;  // indices into State::parameters
  std::vector<int64_t> offsets;  // each member's place in `buffer`
  int64_t elements = 0;
  at::Tensor buffer;  // [elements] float32, the members' gradients during one reduction
  size_t filled = 0;
  std::vector<bool> has;
  std::unique_ptr<PendingCollective> pending;
};

// Shared with the gradient hooks, which outlive no trainer but are owned by the parameters.
struct State {
  std::shared_ptr<Communicator> group;
  std::vector<Parameter> parameters;
  std::vector<std::pair<size_t, size_t>> place;  // parameter -> (bucket, member)
  std::vector<Bucket> buckets;
  size_t next_to_start = 0;
  bool armed = false;  // only the last micro-batch's backward reduces

  // Collectives must start in the same order on every rank, whatever order the backward finishes
  // buckets in (routing differs between ranks): bucket k starts only after buckets 0..k-1.
  void start_ready() {
    while (next_to_start < buckets.size() && buckets[next_to_start].filled == buckets[next_to_start].members.size()) {
      Bucket& bucket = buckets[next_to_start++];
      bucket.pending = group->start_all_reduce_sum(bucket.buffer);
    }
  }
  // The final gradient of `index` is what it holds from earlier micro-batches plus `latest`.
  void fill(size_t index, const at::Tensor& latest) {
    auto [b, member] = place[index];
    Bucket& bucket = buckets[b];
    if (bucket.has[member]) return;
    const at::Tensor& accumulated = parameters[index].tensor.grad();
    at::Tensor total = accumulated.defined() ? (latest.defined() ? accumulated + latest : accumulated) : latest;
    at::Tensor slot = bucket.buffer.narrow(0, bucket.offsets[member], parameters[index].tensor.numel());
    if (total.defined()) slot.copy_(total.reshape(-1));
    else slot.zero_();
    bucket.has[member] = true;
    ++bucket.filled;
  }
};

class DataParallelSchedule final : public Schedule {
 public:
  DataParallelSchedule(Options& options, const PluginContext& context) : state_(std::make_shared<State>()), log_(context.logger) {
    const double bucket_mb = options.number("bucket_mb", 25.0, Range::above(0));
    state_->group = context.communicator;
    const int64_t bucket_limit = std::max<int64_t>(1, static_cast<int64_t>(bucket_mb * 1024 * 1024 / 4));
    // Expert blocks are summed over their own group by the core (Schedule::reduces_gradients).
    for (const auto& parameter : context.parameters)
      if (!parameter.expert_sharded) state_->parameters.push_back(parameter);
    state_->place.resize(state_->parameters.size());
    // Reverse order: the backward produces the last layers' gradients first.
    for (size_t i = state_->parameters.size(); i-- > 0;) {
      const Parameter& parameter = state_->parameters[i];
      if (!parameter.tensor.requires_grad())
        throw Error("schedule 'data_parallel': parameter '" + parameter.name + "' gets no gradient of its own (a " +
                    "float32 master copy of a bfloat16 model); use it with train.dtype = \"float32\", or schedule 'single'");
      if (state_->buckets.empty() || state_->buckets.back().elements >= bucket_limit) state_->buckets.emplace_back();
      Bucket& bucket = state_->buckets.back();
      state_->place[i] = {state_->buckets.size() - 1, bucket.members.size()};
      bucket.members.push_back(i);
      bucket.offsets.push_back(bucket.elements);
      bucket.elements += parameter.tensor.numel();
    }
    if (!state_->group) return;  // one process: nothing to reduce
    for (size_t i = 0; i < state_->parameters.size(); ++i) {
      std::weak_ptr<State> weak = state_;
      state_->parameters[i].tensor.register_hook([weak, i](const at::Tensor& grad) {
        auto state = weak.lock();
        if (!state || !state->armed) return;
        state->fill(i, grad);
        if (state->buckets[state->place[i].first].filled == state->buckets[state->place[i].first].members.size())
          state->start_ready();
      });
    }
  }

  bool reduces_gradients() const override { return true; }

  StepResult run_step(const StepFunctions& step) override {
    if (!state_->group) return accumulate_and_step(step);
    return accumulate_and_step(step, [this] { arm(); }, [this] { finish(); });
  }

 private:
  void arm() {
    for (auto& bucket : state_->buckets) {
      const auto& first = state_->parameters[bucket.members.front()].tensor;
      bucket.buffer = at::empty({bucket.elements}, first.options().dtype(at::kFloat));
      bucket.filled = 0;
      bucket.has.assign(bucket.members.size(), false);
    }
    state_->next_to_start = 0;
    state_->armed = true;
  }

  // After the backward: complete the buckets whose gradients never came (parameters this rank did not
  // use), start what is left in order, wait, and hand back the mean.
  void finish() {
    state_->armed = false;
    const size_t started_during_backward = state_->next_to_start;
    for (auto& bucket : state_->buckets)
      for (size_t member = 0; member < bucket.members.size(); ++member)
        if (!bucket.has[member]) state_->fill(bucket.members[member], at::Tensor());
    state_->start_ready();
    const double ranks = static_cast<double>(state_->group->size());
    for (auto& bucket : state_->buckets) {
      bucket.pending->wait();
      bucket.pending.reset();
      for (size_t member = 0; member < bucket.members.size(); ++member) {
        at::Tensor& tensor = state_->parameters[bucket.members[member]].tensor;
        tensor.mutable_grad() =
            (bucket.buffer.narrow(0, bucket.offsets[member], tensor.numel()).view(tensor.sizes()) / ranks).to(tensor.scalar_type());
      }
      bucket.buffer = at::Tensor();
    }
    // Once, for the user: how much of the communication the backward hid.
    if (!reported_ && log_ != nullptr && state_->group->rank() == 0)
      log_->info("schedule data_parallel: {} gradient bucket(s), {} started while the backward ran", state_->buckets.size(),
                 started_during_backward);
    reported_ = true;
  }

  std::shared_ptr<State> state_;
  spdlog::logger* log_ = nullptr;
  bool reported_ = false;
};

}  // namespace

std::unique_ptr<Schedule> make_data_parallel_schedule(Options& options, const PluginContext& context) {
  return std::make_unique<DataParallelSchedule>(options, context);
}

}  // namespace pithtrain
