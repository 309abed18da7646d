// The process group a multi-process run trains over, as plugins see it (PluginContext::communicator;
// null in a one-process run). Backed by LibTorch's c10d (Gloo on CPUs).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include <ATen/core/Tensor.h>

namespace pithtrain {

// A collective in flight (Communicator::start_all_reduce_sum); wait() returns once its result is in place.
class PendingCollective {
 public:
  virtual ~PendingCollective() = default;
  virtual void wait() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int64_t rank() const = 0;
  virtual int64_t size() const = 0;
  // Sums each tensor over all ranks, in place; every rank must call it with the same shapes.
  virtual void all_reduce_sum(std::vector<at::Tensor>& tensors) = 0;
  // Variable-size all-to-all over dimension 0, differentiable: the first send_counts[0] rows of `input`
  // go to rank 0, the next send_counts[1] to rank 1, ...; returns the rows received, receive_counts[r]
  // from rank r, in rank order. receive_counts must be what the peers send (exchange the counts first).
  // The backward returns the gradient the same way in reverse. Counts may be zero.
  virtual at::Tensor all_to_all(const at::Tensor& input, const std::vector<int64_t>& send_counts,
                                const std::vector<int64_t>& receive_counts) = 0;
  // Every rank's `tensor` (equal shapes) concatenated along dimension 0 in rank order; not differentiable.
  virtual at::Tensor all_gather(const at::Tensor& tensor) = 0;
  // Sums `input` ([size() * n, ...], equal shapes on every rank) over all ranks and returns this rank's
  // part of the sum: rows [rank() * n, (rank() + 1) * n). Not differentiable.
  virtual at::Tensor reduce_scatter_sum(const at::Tensor& input) = 0;
  // Point to point: starts sending `tensor` (contiguous, kept alive until wait()) to rank `to`; the
  // receiver calls receive() with the same tag, shape and dtype. Messages between two ranks with the
  // same tag arrive in order.
  virtual std::unique_ptr<PendingCollective> start_send(at::Tensor tensor, int64_t to, int64_t tag) = 0;
  // Waits for and returns the tensor rank `from` sends with `tag`, on the caller's device.
  virtual at::Tensor receive(const std::vector<int64_t>& shape, c10::ScalarType dtype, int64_t from, int64_t tag) = 0;
  // Starts summing `buffer` (one contiguous float32 tensor on the group's device) over all ranks in
  // place and returns at once, so computation can go on meanwhile; every rank must start the same
  // buffers in the same order, and must not touch `buffer` before wait().
  virtual std::unique_ptr<PendingCollective> start_all_reduce_sum(at::Tensor buffer) = 0;
};

}  // namespace pithtrain
