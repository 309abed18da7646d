// Ring attention (context parallelism) over 2 and 4 Gloo ranks with the load-balanced causal split
// equals full causal attention in outputs and in the gradients of q, k and v (double, 1e-12). The
// ranks are this executable started again by `launch` with PITHTRAIN_RING_CHECK set.
#include <gtest/gtest.h>

#include <cstdlib>
#include <iostream>
#include <limits>

#include <ATen/ATen.h>

#include "distributed.h"
#include "pithtrain/nn.h"

using namespace pithtrain;

namespace {

constexpr int64_t kBatch = 2, kHeads = 4, kKvHeads = 2, kHeadDim = 8, kSeq = 24;

// Plain causal attention over the whole sequence, query head i using kv head i / (h / kv).
at::Tensor full_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  at::Tensor k_all = k.repeat_interleave(kHeads / kKvHeads, 1), v_all = v.repeat_interleave(kHeads / kKvHeads, 1);
  at::Tensor scores = at::matmul(q, k_all.transpose(-1, -2)) / std::sqrt(static_cast<double>(kHeadDim));
  at::Tensor future = at::ones({kSeq, kSeq}, at::kBool).triu(1);
  return at::matmul(at::softmax(scores.masked_fill(future, -std::numeric_limits<double>::infinity()), -1), v_all);
}

// This rank's tokens under the balanced split: chunk r and chunk 2C - 1 - r of 2C equal chunks.
at::Tensor balanced_positions(int64_t rank, int64_t ranks) {
  const int64_t chunk = kSeq / (2 * ranks);
  return at::cat({at::arange(rank * chunk, (rank + 1) * chunk, at::kLong),
                  at::arange((2 * ranks - 1 - rank) * chunk, (2 * ranks - rank) * chunk, at::kLong)});
}

int compare(const char* what, const at::Tensor& got, const at::Tensor& expected, int64_t rank) {
  const double difference = (got - expected).abs().max().item<double>();
  if (difference <= 1e-12) return 0;
  std::cerr << "rank " << rank << ": " << what << " differs by " << difference << "\n";
  return 1;
}

int run_rank() {
  const ProcessEnvironment environment = process_environment().value();
  ProcessGroups groups = connect(environment, "cpu", 60.0);
  const int64_t rank = environment.rank, ranks = environment.world_size;
  at::manual_seed(3);  // the same full tensors on every rank
  at::Tensor q = at::randn({kBatch, kHeads, kSeq, kHeadDim}, at::kDouble).requires_grad_(true);
  at::Tensor k = at::randn({kBatch, kKvHeads, kSeq, kHeadDim}, at::kDouble).requires_grad_(true);
  at::Tensor v = at::randn({kBatch, kKvHeads, kSeq, kHeadDim}, at::kDouble).requires_grad_(true);
  at::Tensor probe = at::randn({kBatch, kHeads, kSeq, kHeadDim}, at::kDouble);
  at::Tensor expected = full_attention(q, k, v);
  (expected * probe).sum().backward();

  const at::Tensor positions = balanced_positions(rank, ranks);
  at::Tensor q_local = q.detach().index_select(2, positions).requires_grad_(true);
  at::Tensor k_local = k.detach().index_select(2, positions).requires_grad_(true);
  at::Tensor v_local = v.detach().index_select(2, positions).requires_grad_(true);
  at::Tensor out = ring_attention(q_local, k_local, v_local, positions, *groups.world);
  (out * probe.index_select(2, positions)).sum().backward();
  return compare("output", out, expected.detach().index_select(2, positions), rank) +
         compare("q gradient", q_local.grad(), q.grad().index_select(2, positions), rank) +
         compare("k gradient", k_local.grad(), k.grad().index_select(2, positions), rank) +
         compare("v gradient", v_local.grad(), v.grad().index_select(2, positions), rank);
}

int launch_job(int64_t ranks) {
  ::setenv("PITHTRAIN_RING_CHECK", "1", 1);
  const int status = launch(ranks, {});
  ::unsetenv("PITHTRAIN_RING_CHECK");
  return status;
}

}  // namespace

TEST(RingAttention, TwoAndFourRanksEqualFullCausalAttentionWithGradients) {
  EXPECT_EQ(launch_job(2), 0);
  EXPECT_EQ(launch_job(4), 0);
}

int main(int argc, char** argv) {
  if (std::getenv("PITHTRAIN_RING_CHECK")) {
    try {
      return run_rank() == 0 ? 0 : 1;
    } catch (const std::exception& error) {
      std::cerr << "rank " << std::getenv("RANK") << ": " << error.what() << "\n";
      return 1;
    }
  }
  testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
