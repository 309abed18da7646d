// Ring attention for context parallelism: each rank keeps its queries; key/value blocks travel around
// the context group and the partial results merge with an online softmax (log-sum-exp rescaling). The
// backward passes the blocks around again, with their key/value gradients, which end at their owner.
#include <cmath>
#include <limits>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "pithtrain/distributed.h"
#include "pithtrain/nn.h"

namespace pithtrain {
namespace {

// Scores of the queries against one key block, masked causally by global position: [B, h, Lq, Lk].
at::Tensor block_scores(const at::Tensor& q, const at::Tensor& k_repeated, const at::Tensor& query_positions,
                        const at::Tensor& key_positions, double scale) {
  at::Tensor scores = at::matmul(q, k_repeated.transpose(-1, -2)) * scale;
  at::Tensor visible = key_positions.unsqueeze(0) <= query_positions.unsqueeze(1);  // [Lq, Lk]
  return scores.masked_fill(visible.logical_not(), -std::numeric_limits<double>::infinity());
}

// Sends `tensor` to the next rank and returns what the previous rank sent (same shape and dtype).
at::Tensor pass_on(Communicator& group, const at::Tensor& tensor, int64_t tag) {
  const int64_t size = group.size(), rank = group.rank();
  auto pending = group.start_send(tensor.contiguous(), (rank + 1) % size, tag);
  at::Tensor received = group.receive(tensor.sizes().vec(), tensor.scalar_type(), (rank + size - 1) % size, tag);
  pending->wait();
  return received.to(tensor.device());
}

struct RingAttentionFunction : public torch::autograd::Function<RingAttentionFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* context, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& positions, int64_t group_address) {
    Communicator& group = *reinterpret_cast<Communicator*>(group_address);
    const auto compute = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const int64_t groups = q.size(1) / k.size(1), ranks = group.size(), rank = group.rank();
    const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
    at::Tensor q32 = q.to(compute);
    at::Tensor all_positions = group.all_gather(positions.to(at::kLong).cpu().unsqueeze(0)).to(q.device());  // [ranks, L]
    at::Tensor key_value = at::stack({k, v}).to(compute);  // [2, B, kv, L, D], the block now held
    at::Tensor out = at::zeros_like(q32);                                                           // [B, h, L, D]
    at::Tensor lse = at::full(q.sizes().slice(0, 3), -std::numeric_limits<double>::infinity(), q32.options());  // [B, h, L]
    for (int64_t step = 0; step < ranks; ++step) {
      const int64_t source = (rank - step + ranks) % ranks;
      // Start the exchange first so the transfer overlaps the block's arithmetic.
      std::unique_ptr<PendingCollective> sending;
      if (step + 1 < ranks) sending = group.start_send(key_value.contiguous(), (rank + 1) % ranks, step);
      at::Tensor k_block = key_value[0].repeat_interleave(groups, 1), v_block = key_value[1].repeat_interleave(groups, 1);
      at::Tensor scores = block_scores(q32, k_block, positions, all_positions[source], scale);
      at::Tensor block_lse = at::logsumexp(scores, -1);                                             // [B, h, L]
      at::Tensor seen = at::isfinite(block_lse);
      at::Tensor probs = at::where(seen.unsqueeze(-1), at::exp(scores - block_lse.unsqueeze(-1)), at::zeros_like(scores));
      at::Tensor block_out = at::matmul(probs, v_block);
      at::Tensor new_lse = at::where(seen, at::logaddexp(lse, block_lse), lse);
      at::Tensor old_weight = at::where(at::isfinite(lse), at::exp(lse - new_lse), at::zeros_like(lse));
      at::Tensor new_weight = at::where(seen, at::exp(block_lse - new_lse), at::zeros_like(lse));
      out = out * old_weight.unsqueeze(-1) + block_out * new_weight.unsqueeze(-1);
      lse = new_lse;
      if (sending) {
        key_value = group.receive(key_value.sizes().vec(), key_value.scalar_type(), (rank + ranks - 1) % ranks, step).to(q.device());
        sending->wait();
      }
    }
    context->save_for_backward({q, k, v, out, lse, positions, all_positions});
    context->saved_data["group"] = group_address;
    return out.to(q.scalar_type());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* context, torch::autograd::variable_list grads) {
    Communicator& group = *reinterpret_cast<Communicator*>(context->saved_data["group"].toInt());
    auto saved = context->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const at::Tensor &positions = saved[5], &all_positions = saved[6];
    const auto compute = out.scalar_type();
    const int64_t heads = q.size(1), kv_heads = k.size(1), groups = heads / kv_heads, ranks = group.size(), rank = group.rank();
    const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
    at::Tensor q32 = q.to(compute), grad_out = grads[0].to(compute);
    at::Tensor row_dot = (grad_out * out).sum(-1, /*keepdim=*/true);  // [B, h, L, 1]
    at::Tensor grad_q = at::zeros_like(q32);
    // The held block and the gradients gathered for it so far: [4, B, kv, L, D] = k, v, dk, dv.
    at::Tensor block = at::stack({k.to(compute), v.to(compute), at::zeros_like(k, compute), at::zeros_like(v, compute)});
    auto fold = [&](const at::Tensor& per_head) {  // [B, h, L, D] -> [B, kv, L, D], summing a kv head's queries
      return per_head.view({per_head.size(0), kv_heads, groups, per_head.size(2), per_head.size(3)}).sum(2);
    };
    for (int64_t step = 0; step < ranks; ++step) {
      const int64_t source = (rank - step + ranks) % ranks;
      at::Tensor k_block = block[0].repeat_interleave(groups, 1), v_block = block[1].repeat_interleave(groups, 1);
      at::Tensor scores = block_scores(q32, k_block, positions, all_positions[source], scale);
      at::Tensor probs = at::exp(scores - lse.unsqueeze(-1));  // the final softmax's share of this block
      at::Tensor grad_scores = probs * (at::matmul(grad_out, v_block.transpose(-1, -2)) - row_dot);
      grad_q += at::matmul(grad_scores, k_block) * scale;
      block = at::stack({block[0], block[1], block[2] + fold(at::matmul(grad_scores.transpose(-1, -2), q32) * scale),
                         block[3] + fold(at::matmul(probs.transpose(-1, -2), grad_out))});
      if (ranks == 1) break;
      // Pass the block on; after the last step only its gradients travel, which brings them home.
      block = step + 1 < ranks ? pass_on(group, block, 1000 + step) : pass_on(group, block.narrow(0, 2, 2), 2000);
    }
    const at::Tensor grad_k = ranks == 1 ? block[2] : block[0], grad_v = ranks == 1 ? block[3] : block[1];
    return {grad_q.to(q.scalar_type()), grad_k.to(k.scalar_type()), grad_v.to(v.scalar_type()), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor ring_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                          Communicator& group) {
  return RingAttentionFunction::apply(q, k, v, positions, reinterpret_cast<int64_t>(&group));
}

}  // namespace pithtrain
