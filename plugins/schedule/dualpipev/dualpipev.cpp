// DualPipeV: a V-shaped pipeline. The core cuts the model chain into 2P chunks; stage s runs chunk s
// (chunk 0 here, activations flowing to stage s + 1) and chunk 2P - 1 - s (chunk 1, flowing back to
// s - 1), so stage 0 holds both the embedding and the head. Forwards and backwards of different
// micro-batches run as pairs, and some backwards leave their weight gradients for later (W) to fill
// the bubbles: the published bubble per stage is (P - 1)(F&B + B - 3W).
#include <chrono>
#include <deque>
#include <map>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <spdlog/spdlog.h>

#include "pithtrain/distributed.h"
#include "pithtrain/nn.h"
#include "pithtrain/pipeline_trace.h"
#include "pithtrain/schedule.h"

namespace pithtrain {
namespace {

using Clock = std::chrono::steady_clock;

// One step of a stage's order: a forward, a backward (its weight gradients deferred or not), a
// forward paired with a backward of another micro-batch, or the oldest deferred weight gradients.
struct Operation {
  enum Kind { kForward, kBackward, kPair, kWeights } kind = kForward;
  int chunk = 0;                // forward's chunk (kForward, kPair) or backward's (kBackward)
  int backward_chunk = 0;       // kPair: the backward's chunk
  bool defer_weights = false;   // kBackward
};

// The DualPipeV order of stage `stage` of `stages` for `micro_batches` (>= 2 * stages) micro-batches
// per chunk. Micro-batches go through each chunk in order, so an operation names only chunks.
std::vector<Operation> dualpipev_order(int64_t stages, int64_t stage, int64_t micro_batches) {
  std::vector<Operation> order;
  auto forward = [&](int chunk) { order.push_back({Operation::kForward, chunk, 0, false}); };
  auto backward = [&](int chunk, bool defer) { order.push_back({Operation::kBackward, chunk, 0, defer}); };
  auto pair = [&](int forward_chunk, int backward_chunk) { order.push_back({Operation::kPair, forward_chunk, backward_chunk, false}); };
  auto weights = [&] { order.push_back({Operation::kWeights, 0, 0, false}); };
  const int64_t later = stages - stage - 1;  // stages after this one
  // Warm-up: chunk-0 forwards fill the way down; then chunk 0 and chunk 1 alternate.
  for (int64_t i = 0; i < 2 * later; ++i) forward(0);
  for (int64_t i = 0; i <= stage; ++i) forward(0), forward(1);
  // The first chunk-1 backwards split off their weight gradients and run them while chunk 1 fills.
  for (int64_t i = 0; i < later; ++i) backward(1, true), weights(), forward(1);
  // Steady state: every forward paired with a backward of the other chunk.
  for (int64_t i = 0; i < micro_batches - 2 * stages + stage + 1; ++i) pair(0, 1), pair(1, 0);
  for (int64_t i = 0; i < later; ++i) backward(1, false), pair(1, 0);
  // Drain: the backwards of both chunks; from the middle of this phase on they defer their weight
  // gradients (odd stages one backward earlier), which then fill the tail.
  bool defer = false;
  for (int64_t i = 0; i <= stage; ++i) {
    if (i == (stage + 1) / 2 && stage % 2 == 1) defer = true;
    backward(1, defer);
    if (i == (stage + 1) / 2 && stage % 2 == 0) defer = true;
    backward(0, defer);
  }
  for (int64_t i = 0; i < later; ++i) weights(), backward(0, true);
  for (int64_t i = 0; i <= stage; ++i) weights();
  return order;
}

class DualPipeVSchedule final : public Schedule {
 public:
  DualPipeVSchedule(Options& options, const PluginContext& context)
      : group_(context.pipeline_group), trace_(options, context, "dualpipev") {
    stages_ = group_ ? group_->size() : 1;
    stage_ = group_ ? group_->rank() : 0;
    // Linear layers built from now on can leave their weight gradients for a later W.
    WeightGradientQueue::enable_deferral(true);
  }
  ~DualPipeVSchedule() override { WeightGradientQueue::enable_deferral(false); }

  bool runs_pipeline_stages() const override { return true; }
  int64_t chunks_per_stage() const override { return 2; }

  StepResult run_step(const StepFunctions& step) override {
    if (step.units < 1 || !step.forward_unit || step.stage_chunks.size() != 2)
      throw Error("schedule 'dualpipev' needs the model as a chain of units with two chunks on this stage "
                  "(StepFunctions::stage_chunks)");
    if (step.micro_batches < 2 * stages_)
      throw Error("schedule 'dualpipev' needs at least 2 x parallel.pipeline = " + std::to_string(2 * stages_) +
                  " micro-batches per step, and this run has " + std::to_string(step.micro_batches) +
                  " (train.global_batch_size / (train.batch_size x parallel.data)): raise train.global_batch_size "
                  "or lower train.batch_size, or use schedule.plugin = \"pipeline_1f1b\"");
    const auto step_start = Clock::now();
    trace_.start_step(stage_);
    durations_ = {};
    StepResult result;
    step.zero_grad();
    scale_ = 1.0 / static_cast<double>(step.micro_batches);
    int64_t pair_index = 0;
    for (const Operation& operation : dualpipev_order(stages_, stage_, step.micro_batches)) {
      switch (operation.kind) {
        case Operation::kForward: forward(step, operation.chunk, result, -1); break;
        case Operation::kBackward: backward(step, operation.chunk, operation.defer_weights, -1); break;
        case Operation::kPair: {
          // On a CPU the two run one after the other; what overlaps is the communication of one with
          // the computation of the other (sends are asynchronous).
          const auto start = Clock::now();
          forward(step, operation.chunk, result, pair_index);
          backward(step, operation.backward_chunk, false, pair_index);
          durations_.add(durations_.pair, Clock::now() - start);
          ++pair_index;
          break;
        }
        case Operation::kWeights: {
          const auto start = Clock::now();
          weights_.run_oldest();
          record('W', 0, -1, false, -1, start);
          durations_.add(durations_.weights, Clock::now() - start);
          break;
        }
      }
    }
    if (weights_.pending() != 0 || !pending_[0].empty() || !pending_[1].empty())
      throw Error("schedule 'dualpipev': the step ended with work left over (an internal error)");
    for (auto& pending : sends_) pending->wait();
    sends_.clear();
    const double step_seconds = std::chrono::duration<double>(Clock::now() - step_start).count();
    report_bubble(step, step_seconds);
    trace_.finish_step();
    next_forward_[0] = next_forward_[1] = 0;
    result.grad_norm = step.clip_gradients();
    step.optimizer_step();
    step.after_optimizer_step();
    return result;
  }

 private:
  bool first_stage() const { return stage_ == 0; }
  bool last_stage() const { return stage_ == stages_ - 1; }
  // Message tags between neighbours: each micro-batch has four (each chunk's activation and gradient).
  static int64_t tag(int64_t micro_batch, int chunk, bool gradient) { return 4 * micro_batch + 2 * chunk + (gradient ? 1 : 0); }

  // Chunk 0 receives from the previous stage and sends to the next; chunk 1 the other way round. On
  // the last stage chunk 0's output is chunk 1's input, handed over in place.
  void forward(const StepFunctions& step, int chunk, StepResult& result, int64_t pair) {
    MicroBatchInFlight entry;
    const int64_t micro_batch = entry.micro_batch = next_forward_[chunk]++;
    if (chunk == 0 && !first_stage()) {
      entry.input = group_->receive(step.activation_shape, step.activation_dtype, stage_ - 1, tag(micro_batch, 0, false));
    } else if (chunk == 1 && last_stage()) {
      entry.input = handed_activations_.at(micro_batch);
      handed_activations_.erase(micro_batch);
    } else if (chunk == 1) {
      entry.input = group_->receive(step.activation_shape, step.activation_dtype, stage_ + 1, tag(micro_batch, 1, false));
    }
    if (entry.input.defined()) entry.input.requires_grad_(true);
    const auto start = Clock::now();
    run_pipeline_chunk(step, step.stage_chunks[chunk], entry);
    const at::Tensor& x = entry.output;
    record('F', chunk, micro_batch, false, pair, start);
    if (pair < 0) durations_.add(durations_.forward, Clock::now() - start);
    const bool head = chunk == 1 && first_stage();
    if (chunk == 0 && last_stage())
      handed_activations_[micro_batch] = x.detach();
    else if (chunk == 0)
      sends_.push_back(group_->start_send(x.detach().contiguous(), stage_ + 1, tag(micro_batch, 0, false)));
    else if (!head)
      sends_.push_back(group_->start_send(x.detach().contiguous(), stage_ - 1, tag(micro_batch, 1, false)));
    add_pipeline_figures(step, entry, head, scale_, result);
    pending_[chunk].push_back(std::move(entry));
  }

  void backward(const StepFunctions& step, int chunk, bool defer_weights, int64_t pair) {
    MicroBatchInFlight entry = std::move(pending_[chunk].front());
    pending_[chunk].pop_front();
    const int64_t micro_batch = entry.micro_batch;
    std::vector<at::Tensor> roots = {entry.output}, grads;
    if (chunk == 1 && first_stage()) {
      grads.push_back(at::full_like(entry.output, scale_));
    } else if (chunk == 0 && last_stage()) {
      grads.push_back(handed_gradients_.at(micro_batch));
      handed_gradients_.erase(micro_batch);
    } else {
      const int64_t from = chunk == 0 ? stage_ + 1 : stage_ - 1;
      grads.push_back(group_->receive(step.activation_shape, step.activation_dtype, from, tag(micro_batch, chunk, true)));
    }
    if (entry.aux_loss.defined() && entry.aux_loss.requires_grad())
      roots.push_back(entry.aux_loss), grads.push_back(at::full_like(entry.aux_loss, scale_));
    const auto start = Clock::now();
    if (defer_weights)
      weights_.defer([&] { torch::autograd::backward(roots, grads); });
    else
      torch::autograd::backward(roots, grads);
    record('B', chunk, micro_batch, defer_weights, pair, start);
    if (!defer_weights) durations_.add(durations_.backward, Clock::now() - start);  // B of the formula: a whole backward
    if (entry.input.defined()) {
      at::Tensor input_grad = entry.input.grad().defined() ? entry.input.grad() : at::zeros_like(entry.input);
      if (chunk == 1 && last_stage())
        handed_gradients_[micro_batch] = input_grad;
      else
        sends_.push_back(group_->start_send(input_grad.contiguous(), chunk == 0 ? stage_ - 1 : stage_ + 1, tag(micro_batch, chunk, true)));
    }
  }

  void record(char kind, int chunk, int64_t micro_batch, bool deferred, int64_t pair, Clock::time_point start) {
    trace_.record(start, fmt::format("\"kind\":\"{}\",\"chunk\":{},\"micro_batch\":{},\"deferred\":{},\"pair\":{}", kind,
                                     chunk, micro_batch, deferred ? "true" : "false", pair));
  }

  // The measured bubble (share of the step a stage does not compute, mean over stages) next to the
  // published DualPipeV bubble (P - 1)(F&B + B - 3W) evaluated with this step's mean durations over
  // every stage: F a lone forward, B a whole backward, W deferred weight gradients, F&B a pair.
  void report_bubble(const StepFunctions& step, double step_seconds) {
    const double busy_seconds = trace_.busy_seconds();
    std::vector<double> sums = {1.0 - busy_seconds / std::max(step_seconds, 1e-9), busy_seconds};
    for (const auto* figure : {&durations_.forward, &durations_.backward, &durations_.weights, &durations_.pair})
      sums.push_back(figure->first), sums.push_back(static_cast<double>(figure->second));
    std::vector<at::Tensor> figures = {at::tensor(sums, at::kDouble)};
    if (group_) group_->all_reduce_sum(figures);
    auto total = figures[0];
    auto mean = [&](int64_t index) { return total[index].item<double>() / std::max(total[index + 1].item<double>(), 1.0); };
    const double bubble = total[0].item<double>() / static_cast<double>(stages_);
    const double busy = total[1].item<double>() / static_cast<double>(stages_);
    const double forward = mean(2), backward = mean(4), weights = mean(6), pair = mean(8);
    const double theory_seconds = std::max(0.0, static_cast<double>(stages_ - 1) * (pair + backward - 3 * weights));
    const double theory = theory_seconds / std::max(theory_seconds + busy, 1e-12);
    if (trace_.logs_bubble())
      trace_.log()->info("schedule dualpipev: {} stage(s) x 2 chunks, {} micro-batches: measured bubble {:.1f}% of the step "
                 "(mean over stages), DualPipeV theory (P-1)(F&B+B-3W) = {:.1f} ms = {:.1f}% "
                 "(measured F {:.2f}, B {:.2f}, W {:.2f}, F&B {:.2f} ms)",
                 stages_, step.micro_batches, 100 * bubble, 1e3 * theory_seconds, 100 * theory, 1e3 * forward, 1e3 * backward,
                 1e3 * weights, 1e3 * pair);
  }

  // Sums and counts of this step's durations in seconds.
  struct Durations {
    std::pair<double, int64_t> forward, backward, weights, pair;
    void add(std::pair<double, int64_t>& figure, Clock::duration elapsed) {
      figure.first += std::chrono::duration<double>(elapsed).count();
      ++figure.second;
    }
  };

  std::shared_ptr<Communicator> group_;
  PipelineTrace trace_;
  int64_t stages_ = 1, stage_ = 0;
  double scale_ = 1;
  Durations durations_;
  int64_t next_forward_[2] = {0, 0};
  std::deque<MicroBatchInFlight> pending_[2];
  std::map<int64_t, at::Tensor> handed_activations_, handed_gradients_;  // last stage: chunk 0 <-> chunk 1
  WeightGradientQueue weights_;
  std::vector<std::unique_ptr<PendingCollective>> sends_;
};

}  // namespace

std::unique_ptr<Schedule> make_dualpipev_schedule(Options& options, const PluginContext& context) {
  return std::make_unique<DualPipeVSchedule>(options, context);
}

}  // namespace pithtrain
