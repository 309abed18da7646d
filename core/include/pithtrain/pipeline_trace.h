// What the pipeline schedules (pipeline_1f1b, dualpipev) share: a micro-batch in flight, running a
// chunk of units and counting its figures; their reporting keys, the busy time of a step, and its
// recorded trace for scripts/pipeline_timeline.py and scripts/pipeline_bubble.py.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "pithtrain/options.h"
#include "pithtrain/plugin.h"
#include "pithtrain/schedule.h"

namespace pithtrain {

// One micro-batch of one chunk of units between its forward and its backward.
struct MicroBatchInFlight {
  int64_t micro_batch = 0;
  at::Tensor input;     // [B, S, H] received from a neighbour (requires grad); undefined for the embedding's chunk
  at::Tensor output;    // [B, S, H] sent on, or the cross-entropy [] of the chunk ending in the head
  at::Tensor aux_loss;  // [] the chunk's router losses; undefined when it has none
};

// Runs units [first, end) on entry.input for entry.micro_batch: sets entry.output and entry.aux_loss.
void run_pipeline_chunk(const StepFunctions& step, std::pair<int64_t, int64_t> units, MicroBatchInFlight& entry);

// Adds this stage's share of the step's figures for one forward (the core sums them over the stages):
// its router losses and, for the chunk ending in the head (`head`), the cross-entropy and the tokens.
// scale: 1 / micro-batches.
void add_pipeline_figures(const StepFunctions& step, const MicroBatchInFlight& entry, bool head, double scale, StepResult& result);

class PipelineTrace {
 public:
  using Clock = std::chrono::steady_clock;
  // Reads the schedule table's keys: bubble_every (0: log the bubble on the first two steps only; N:
  // also every N steps), trace_dir ("" off) and trace_step (2). `schedule` names the plugin in the log.
  PipelineTrace(Options& options, const PluginContext& context, std::string schedule);
  // Starts a step on stage `stage`: the busy time and the trace start empty.
  void start_step(int64_t stage);
  // Work on this stage from `start` to now: adds it to the busy time and, when this step is traced,
  // records one event with these JSON fields (written before "start" and "end").
  void record(Clock::time_point start, const std::string& fields);
  // Writes the step's events to trace_dir/stage_S.jsonl when this step is the traced one.
  void finish_step();
  double busy_seconds() const { return busy_seconds_; }
  int64_t steps() const { return steps_; }
  // Whether this rank logs this step's bubble (rank 0 of the job, first two steps or every bubble_every).
  bool logs_bubble() const;
  spdlog::logger* log() const { return log_; }

 private:
  std::string schedule_, dir_;
  spdlog::logger* log_ = nullptr;
  bool reporter_ = false, tracer_ = false;
  int64_t bubble_every_ = 0, trace_step_ = 2, steps_ = 0, stage_ = 0;
  double busy_seconds_ = 0;
  std::vector<std::string> events_;  // this step's events, JSON lines
};

}  // namespace pithtrain
