// The step profiler over LibTorch's Kineto profiler API.
#include "profiler.h"

#include <algorithm>
#include <map>

#include <spdlog/spdlog.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include "pithtrain/error.h"
#include "pithtrain/plugin.h"

namespace pithtrain {
namespace profiler = torch::autograd::profiler;

StepProfiler::StepProfiler(const std::string& steps, const std::string& run_dir, bool cuda) : run_dir_(run_dir), cuda_(cuda) {
  try {
    size_t dash = steps.find('-');
    if (dash == std::string::npos) {
      first_ = 2;
      last_ = 1 + std::stoll(steps);
    } else {
      first_ = std::stoll(steps.substr(0, dash));
      last_ = std::stoll(steps.substr(dash + 1));
    }
  } catch (const std::exception&) {
    first_ = last_ = 0;
  }
  if (first_ < 1 || last_ < first_)
    throw Error("--profile '" + steps + "': expected N (steps 2..N+1) or A-B with 1 <= A <= B, e.g. --profile 5-7");
}

void StepProfiler::before_step(int64_t step) {
  if (step != first_) return;
  profiler::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
  std::set<torch::profiler::impl::ActivityType> activities{torch::profiler::impl::ActivityType::CPU};
  if (cuda_) activities.insert(torch::profiler::impl::ActivityType::CUDA);
  profiler::prepareProfiler(config, activities);
  profiler::enableProfiler(config, activities);
  active_ = true;
}

void StepProfiler::after_step(int64_t step, bool quiet) {
  if (!active_ || step != last_) return;
  active_ = false;
  auto result = profiler::disableProfiler();
  const std::string trace = run_dir_ + "/profile_steps_" + std::to_string(first_) + "-" + std::to_string(last_) + ".json";
  result->save(trace);

  // Self time = an operator's duration minus that of the operators nested directly inside it (same thread).
  std::vector<const profiler::KinetoEvent*> events;
  for (const auto& event : result->events())
    if (event.deviceType() == c10::DeviceType::CPU) events.push_back(&event);
  std::sort(events.begin(), events.end(), [](auto* a, auto* b) {
    if (a->startThreadId() != b->startThreadId()) return a->startThreadId() < b->startThreadId();
    if (a->startNs() != b->startNs()) return a->startNs() < b->startNs();
    return a->endNs() > b->endNs();
  });
  std::vector<uint64_t> children(events.size(), 0);
  std::vector<size_t> stack;
  for (size_t i = 0; i < events.size(); ++i) {
    while (!stack.empty() && (events[stack.back()]->startThreadId() != events[i]->startThreadId() ||
                              events[stack.back()]->endNs() <= events[i]->startNs()))
      stack.pop_back();
    if (!stack.empty()) children[stack.back()] += events[i]->durationNs();
    stack.push_back(i);
  }
  std::map<std::string, std::pair<double, int64_t>> by_name;  // self ms, calls
  double total_ms = 0;
  for (size_t i = 0; i < events.size(); ++i) {
    double self_ms = static_cast<double>(events[i]->durationNs() - std::min(children[i], events[i]->durationNs())) / 1e6;
    auto& entry = by_name[events[i]->name()];
    entry.first += self_ms;
    entry.second += 1;
    total_ms += self_ms;
  }
  std::vector<std::pair<std::string, std::pair<double, int64_t>>> ranked(by_name.begin(), by_name.end());
  std::sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) { return a.second.first > b.second.first; });
  if (quiet) return;
  auto& log = logger();
  log.info("profile of steps {}-{}: Chrome trace {} (open in chrome://tracing or ui.perfetto.dev)", first_, last_, trace);
  log.info("  {:>10} {:>6} {:>8}  operator (by self time)", "self ms", "%", "calls");
  for (size_t i = 0; i < std::min<size_t>(15, ranked.size()); ++i)
    log.info("  {:>10.2f} {:>6.1f} {:>8}  {}", ranked[i].second.first, 100 * ranked[i].second.first / std::max(total_ms, 1e-9),
             ranked[i].second.second, ranked[i].first);
}

}  // namespace pithtrain
