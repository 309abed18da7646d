// --profile A-B: records the LibTorch (Kineto) profiler over training steps A..B, writes a Chrome trace
// into the run directory and prints the operators with the most self time.
#pragma once
#include <memory>
#include <string>

namespace pithtrain {

class StepProfiler {
 public:
  // `steps` is "A-B" (inclusive) or "N" (steps 2..N+1: step 1 is warm-up). Throws Error on bad syntax.
  // `cuda` adds the CUDA activity (kernels, memcpys) to the CPU operators.
  StepProfiler(const std::string& steps, const std::string& run_dir, bool cuda);
  void before_step(int64_t step);
  void after_step(int64_t step, bool quiet);

 private:
  int64_t first_ = 0, last_ = 0;
  std::string run_dir_;
  bool active_ = false, cuda_ = false;
};

}  // namespace pithtrain
