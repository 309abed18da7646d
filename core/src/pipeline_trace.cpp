// What the pipeline schedules share: running a chunk and its figures; PipelineTrace, the reporting
// keys, busy time and step trace.
#include "pithtrain/pipeline_trace.h"

#include <filesystem>
#include <fstream>

#include <spdlog/spdlog.h>

#include "pithtrain/distributed.h"
#include "pithtrain/error.h"

namespace pithtrain {

void run_pipeline_chunk(const StepFunctions& step, std::pair<int64_t, int64_t> units, MicroBatchInFlight& entry) {
  at::Tensor x = entry.input;
  for (int64_t unit = units.first; unit < units.second; ++unit) {
    UnitOutput output = step.forward_unit(unit, entry.micro_batch, x);
    x = output.output;
    if (output.aux_loss.defined()) entry.aux_loss = entry.aux_loss.defined() ? entry.aux_loss + output.aux_loss : output.aux_loss;
  }
  entry.output = x;
}

void add_pipeline_figures(const StepFunctions& step, const MicroBatchInFlight& entry, bool head, double scale, StepResult& result) {
  const double cross_entropy = head ? entry.output.item<double>() : 0.0;
  const double aux_loss = entry.aux_loss.defined() ? entry.aux_loss.item<double>() : 0.0;
  result.loss += (cross_entropy + aux_loss) * scale;
  result.cross_entropy += cross_entropy * scale;
  result.aux_loss += aux_loss * scale;
  if (head) result.tokens += step.tokens_per_micro_batch;
}

PipelineTrace::PipelineTrace(Options& options, const PluginContext& context, std::string schedule)
    : schedule_(std::move(schedule)), log_(context.logger) {
  bubble_every_ = options.integer("bubble_every", 0, Range::at_least(0));  // 0: the first two steps only
  dir_ = options.text("trace_dir", "");
  trace_step_ = options.integer("trace_step", 2, Range::at_least(1));
  const bool first_data_rank = !context.communicator || context.communicator->rank() == 0;
  // One line for the job: stage 0 of the first pipeline (world rank 0) reports; every stage of the
  // first data rank traces.
  reporter_ = first_data_rank && (!context.pipeline_group || context.pipeline_group->rank() == 0);
  tracer_ = !dir_.empty() && first_data_rank;
}

void PipelineTrace::start_step(int64_t stage) {
  ++steps_;
  stage_ = stage;
  busy_seconds_ = 0;
  events_.clear();
}

void PipelineTrace::record(Clock::time_point start, const std::string& fields) {
  const auto now = Clock::now();
  busy_seconds_ += std::chrono::duration<double>(now - start).count();
  // Seconds of the machine's monotonic clock, so the stages of one machine line up.
  if (tracer_ && steps_ == trace_step_)
    events_.push_back(fmt::format("{{\"stage\":{},{},\"start\":{:.6f},\"end\":{:.6f}}}", stage_, fields,
                                  std::chrono::duration<double>(start.time_since_epoch()).count(),
                                  std::chrono::duration<double>(now.time_since_epoch()).count()));
}

void PipelineTrace::finish_step() {
  if (!tracer_ || steps_ != trace_step_) return;
  std::filesystem::create_directories(dir_);
  const std::string path = dir_ + "/stage_" + std::to_string(stage_) + ".jsonl";
  std::ofstream out(path, std::ios::trunc);
  for (const auto& line : events_) out << line << "\n";
  if (!out) throw Error("schedule.trace_dir: cannot write " + path);
  if (log_ != nullptr && reporter_)
    log_->info("schedule {}: step {} traced to {} (scripts/pipeline_timeline.py {})", schedule_, steps_, dir_, dir_);
}

bool PipelineTrace::logs_bubble() const {
  // Always the first two steps (the first includes start-up costs), then every bubble_every steps.
  return log_ != nullptr && reporter_ && (steps_ <= 2 || (bubble_every_ > 0 && steps_ % bubble_every_ == 0));
}

}  // namespace pithtrain
