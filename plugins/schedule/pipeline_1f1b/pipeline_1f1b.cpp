// PipelineSchedule (1F1B): this rank runs its stage's units of the model chain; activations go to the
// next stage and their gradients come back through point-to-point messages. After P - s - 1 warm-up
// forwards each stage alternates one forward and one backward, then drains the remaining backwards,
// so at most P - s micro-batches are in flight on stage s.
#include <chrono>
#include <deque>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <spdlog/spdlog.h>

#include "pithtrain/distributed.h"
#include "pithtrain/pipeline_trace.h"
#include "pithtrain/schedule.h"

namespace pithtrain {
namespace {

using Clock = std::chrono::steady_clock;

class PipelineSchedule final : public Schedule {
 public:
  PipelineSchedule(Options& options, const PluginContext& context)
      : group_(context.pipeline_group), trace_(options, context, "pipeline_1f1b") {
    stages_ = group_ ? group_->size() : 1;
    stage_ = group_ ? group_->rank() : 0;
  }

  bool runs_pipeline_stages() const override { return true; }

  StepResult run_step(const StepFunctions& step) override {
    if (step.units < 1 || !step.forward_unit || step.stage_chunks.size() != 1)
      throw Error("schedule 'pipeline_1f1b' needs the model as a chain of units with one chunk on this stage "
                  "(StepFunctions::forward_unit, stage_chunks)");
    const auto step_start = Clock::now();
    trace_.start_step(stage_);
    StepResult result;
    step.zero_grad();
    scale_ = 1.0 / static_cast<double>(step.micro_batches);
    std::deque<MicroBatchInFlight> in_flight;
    const int64_t warmup = std::min<int64_t>(stages_ - stage_ - 1, step.micro_batches);
    int64_t forwarded = 0, backwarded = 0;
    for (; forwarded < warmup; ++forwarded) in_flight.push_back(forward(step, forwarded, result));
    for (; forwarded < step.micro_batches; ++forwarded, ++backwarded) {
      in_flight.push_back(forward(step, forwarded, result));
      backward(step, in_flight.front());
      in_flight.pop_front();
    }
    for (; backwarded < step.micro_batches; ++backwarded) {
      backward(step, in_flight.front());
      in_flight.pop_front();
    }
    for (auto& pending : sends_) pending->wait();
    sends_.clear();
    const double step_seconds = std::chrono::duration<double>(Clock::now() - step_start).count();
    report_bubble(step, step_seconds);
    trace_.finish_step();
    result.grad_norm = step.clip_gradients();
    step.optimizer_step();
    step.after_optimizer_step();
    return result;
  }

 private:
  bool first_stage() const { return stage_ == 0; }
  bool last_stage() const { return stage_ == stages_ - 1; }

  MicroBatchInFlight forward(const StepFunctions& step, int64_t micro_batch, StepResult& result) {
    MicroBatchInFlight entry;
    entry.micro_batch = micro_batch;
    if (!first_stage()) {
      entry.input = group_->receive(step.activation_shape, step.activation_dtype, stage_ - 1, 2 * micro_batch);
      entry.input.requires_grad_(true);
    }
    const auto start = Clock::now();
    run_pipeline_chunk(step, step.stage_chunks.front(), entry);
    record('F', micro_batch, start);
    if (!last_stage()) sends_.push_back(group_->start_send(entry.output.detach().contiguous(), stage_ + 1, 2 * micro_batch));
    add_pipeline_figures(step, entry, last_stage(), scale_, result);
    return entry;
  }

  void backward(const StepFunctions& step, MicroBatchInFlight& entry) {
    std::vector<at::Tensor> roots, grads;
    if (last_stage()) {
      roots.push_back(entry.output), grads.push_back(at::full_like(entry.output, scale_));
    } else {
      at::Tensor output_grad = group_->receive(step.activation_shape, step.activation_dtype, stage_ + 1, 2 * entry.micro_batch + 1);
      roots.push_back(entry.output), grads.push_back(output_grad);
    }
    if (entry.aux_loss.defined() && entry.aux_loss.requires_grad())
      roots.push_back(entry.aux_loss), grads.push_back(at::full_like(entry.aux_loss, scale_));
    const auto start = Clock::now();
    torch::autograd::backward(roots, grads);
    record('B', entry.micro_batch, start);
    if (!first_stage()) {
      at::Tensor input_grad = entry.input.grad().defined() ? entry.input.grad() : at::zeros_like(entry.input);
      sends_.push_back(group_->start_send(input_grad.contiguous(), stage_ - 1, 2 * entry.micro_batch + 1));
    }
    entry = MicroBatchInFlight();  // the graph and activations go now
  }

  void record(char kind, int64_t micro_batch, Clock::time_point start) {
    trace_.record(start, fmt::format("\"kind\":\"{}\",\"micro_batch\":{}", kind, micro_batch));
  }

  // Bubble: the share of the step a stage spends not computing (waiting for its neighbours), averaged
  // over the stages, next to the 1F1B figure (P - 1) / (M + P - 1) for equal stages.
  void report_bubble(const StepFunctions& step, double step_seconds) {
    std::vector<at::Tensor> figures = {at::tensor({1.0 - trace_.busy_seconds() / std::max(step_seconds, 1e-9)}, at::kDouble)};
    if (group_) group_->all_reduce_sum(figures);
    const double bubble = figures[0].item<double>() / static_cast<double>(stages_);
    const double theory = static_cast<double>(stages_ - 1) / static_cast<double>(step.micro_batches + stages_ - 1);
    if (trace_.logs_bubble())
      trace_.log()->info("schedule pipeline_1f1b: {} stage(s), {} micro-batches: measured bubble {:.1f}% of the step "
                 "(mean over stages), 1F1B theory (P-1)/(M+P-1) = {:.1f}%",
                 stages_, step.micro_batches, 100 * bubble, 100 * theory);
  }

  std::shared_ptr<Communicator> group_;
  PipelineTrace trace_;
  int64_t stages_ = 1, stage_ = 0;
  double scale_ = 1;
  std::vector<std::unique_ptr<PendingCollective>> sends_;
};

}  // namespace

std::unique_ptr<Schedule> make_pipeline_1f1b_schedule(Options& options, const PluginContext& context) {
  return std::make_unique<PipelineSchedule>(options, context);
}

}  // namespace pithtrain
