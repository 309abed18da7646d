// The process group a multi-process run trains over, as plugins see it (PluginContext::communicator;
// null in a one-process run). Backed by LibTorch's c10d (Gloo on CPUs).
#pragma once
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

namespace pithtrain {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int64_t rank() const = 0;
  virtual int64_t size() const = 0;
  // Sums each tensor over all ranks, in place; every rank must call it with the same shapes.
  virtual void all_reduce_sum(std::vector<at::Tensor>& tensors) = 0;
};

}  // namespace pithtrain
