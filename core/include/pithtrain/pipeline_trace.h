// What the pipeline schedules (pipeline_1f1b, dualpipev) share: their reporting keys, the busy time of
// a step, and its recorded trace for scripts/pipeline_timeline.py and scripts/pipeline_bubble.py.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "pithtrain/options.h"
#include "pithtrain/plugin.h"

namespace pithtrain {

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
