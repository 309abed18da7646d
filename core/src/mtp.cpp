// Multi-token prediction (DeepSeek-V3 technical report, section 2.2), [model] mtp_layers = D depths. Depth k
// (1..D) sees the positions i that have a token k + 1 ahead (i < S - k) and predicts t_{i+k+1}:
//   h'_i = M_k [enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]   M_k: eh_proj [H, 2H]; h^0 the main model's last hidden state,
//                                                       before its final norm (the report's figure 3)
//   h^k  = TRM_k(h')                                    one decoder layer like the model's (attention, MoE or dense)
//   P^k  = softmax(W_head final_norm_k(h^k))            W_head and Emb are the main model's (shared)
//   L_MTP = mtp_loss_coeff / D x sum_k CE(P^k, t_{k+1..S})
// The report writes the concatenation as [hidden; embedding]; the published weights (model.layers.61.eh_proj)
// take the embedding half first, as every implementation that runs them does, so that order is used here.
#include <ATen/ATen.h>

#include "model.h"
#include "pithtrain/kernels.h"
#include "pithtrain/nn.h"

namespace pithtrain {

at::Tensor Model::forward_mtp(const at::Tensor& hidden, const at::Tensor& tokens, ModelOutput& output) {
  if (context_size_ != 1) throw Error("model.mtp_layers > 0 does not split sequences over ranks (parallel.context = 1)");
  const int64_t batch = hidden.size(0), seq = hidden.size(1), width = context_.dims.hidden_size;
  const int64_t depths = static_cast<int64_t>(mtp_.size());
  if (seq <= depths)
    throw Error("model.mtp_layers = " + std::to_string(depths) + " needs sequences longer than " + std::to_string(depths) +
                " tokens (train.seq_len is " + std::to_string(seq) + ")");
  at::Tensor previous = hidden;  // [B, S - k + 1, H] h^{k-1}
  at::Tensor cross_entropy_sum, router_loss;
  for (int64_t k = 1; k <= depths; ++k) {
    MtpDepth& depth = mtp_[k - 1];
    const int64_t positions = seq - k;  // i = 0 .. S - k - 1
    at::Tensor embedded = at::embedding(embedding_, tokens.narrow(1, k, positions).to(context_.device));  // [B, S - k, H] Emb(t_{i+k})
    at::Tensor merged = at::cat({norm(embedded, depth.enorm), norm(previous.narrow(1, 0, positions), depth.hnorm)}, -1);  // [B, S - k, 2H]
    at::Tensor layer_loss;
    at::Tensor x = forward_layer(depth.layer, context_.dims.num_layers + k - 1, pithtrain::linear(merged, depth.eh_proj),
                                 at::arange(positions, at::TensorOptions().dtype(at::kLong).device(context_.device)), output,
                                 layer_loss, /*record_routing=*/false);  // [B, S - k, H]
    at::Tensor targets = tokens.narrow(1, k + 1, positions).to(context_.device).reshape(-1);  // [B (S - k)] t_{i+k+1}
    at::Tensor cross_entropy;
    if (loss_chunk_tokens_ > 0) {
      at::Tensor normed = norm(x, depth.final_norm).reshape({batch * positions, width});  // [T, H]
      cross_entropy = kernels::chunked_cross_entropy(normed, lm_head_, targets, loss_chunk_tokens_);
    } else {
      at::Tensor logits = pithtrain::linear(norm(x, depth.final_norm), lm_head_);  // [B, S - k, V]
      cross_entropy = at::cross_entropy_loss(logits.reshape({batch * positions, -1}).to(at::kFloat), targets);
    }
    cross_entropy_sum = cross_entropy_sum.defined() ? cross_entropy_sum + cross_entropy : cross_entropy;
    if (layer_loss.defined()) router_loss = router_loss.defined() ? router_loss + layer_loss : layer_loss;
    previous = x;
  }
  at::Tensor mean = cross_entropy_sum / static_cast<double>(depths);
  output.mtp_cross_entropy = mean.detach();
  output.mtp_loss = mean * mtp_loss_coeff_;
  return router_loss.defined() ? output.mtp_loss + router_loss : output.mtp_loss;
}

void Model::append_mtp_parameters(std::vector<Parameter>& result) const {
  for (size_t depth = 0; depth < mtp_.size(); ++depth) {
    const MtpDepth& mtp = mtp_[depth];
    const std::string prefix = "mtp_layers." + std::to_string(depth) + ".";
    result.push_back({prefix + "enorm.weight", mtp.enorm, false});
    result.push_back({prefix + "hnorm.weight", mtp.hnorm, false});
    result.push_back({prefix + "eh_proj.weight", mtp.eh_proj, true});
    append_layer_parameters(mtp.layer, prefix, result);
    result.push_back({prefix + "final_norm.weight", mtp.final_norm, false});
  }
}

}  // namespace pithtrain
