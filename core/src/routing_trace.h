// --trace-routing FILE: per step and MoE layer, the tokens each expert received (docs/training.md has
// the format and a reader).
#pragma once
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace pithtrain {

struct RoutingTraceHeader {
  char magic[8];        // "PTROUTE1"
  uint32_t version;     // 1
  uint32_t moe_layers;  // L
  uint32_t experts;     // E
  uint32_t reserved[3];
};
static_assert(sizeof(RoutingTraceHeader) == 32);

class RoutingTrace {
 public:
  // Opens FILE; a resumed run (start_step > 0) keeps the records of steps <= start_step, else starts anew.
  RoutingTrace(const std::string& path, int64_t moe_layers, int64_t experts, int64_t start_step);
  // Appends one record: int64 step, then uint32 counts [L, E].
  void record(int64_t step, const std::vector<at::Tensor>& tokens_per_expert);

  struct Record {
    int64_t step;
    std::vector<uint32_t> counts;  // [L * E], layer-major
  };
  // Reads a whole trace file; throws Error naming the file when it is not one or is truncated.
  static std::pair<RoutingTraceHeader, std::vector<Record>> read(const std::string& path);

 private:
  std::string path_;
  int64_t moe_layers_, experts_;
  std::ofstream out_;
};

}  // namespace pithtrain
