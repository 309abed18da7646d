// DifferentialAttention (Ye et al., "Differential Transformer", arXiv:2410.05258): each head splits its
// query and key in two halves, takes two causal softmax maps and subtracts the second, scaled by a learned
// lambda, to cancel attention noise; the head output is RMS-normalised and scaled by (1 - lambda_init).
#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "pithtrain/attention.h"
#include "pithtrain/nn.h"

namespace pithtrain {
namespace {

class DifferentialAttention final : public Attention {
 public:
  DifferentialAttention(Options&, const PluginContext& context) : dims_(context.dims) {
    const int64_t hidden = dims_.hidden_size, head_dim = dims_.head_dim;
    lambda_init_ = 0.8 - 0.6 * std::exp(-0.3 * std::max<int64_t>(context.layer_index, 0));
    rope_.theta = dims_.rope_theta;
    q_proj_ = normal_parameter({dims_.num_heads * head_dim, hidden}, dims_.init_std, context);
    k_proj_ = normal_parameter({dims_.num_kv_heads * head_dim, hidden}, dims_.init_std, context);
    v_proj_ = normal_parameter({dims_.num_kv_heads * head_dim, hidden}, dims_.init_std, context);
    o_proj_ = normal_parameter({hidden, dims_.num_heads * head_dim}, dims_.init_std, context);
    for (auto* lambda : {&lambda_q1_, &lambda_k1_, &lambda_q2_, &lambda_k2_})
      *lambda = normal_parameter({head_dim / 2}, 0.1, context);
  }

  at::Tensor forward(const at::Tensor& hidden, const at::Tensor& positions) override {
    const int64_t batch = hidden.size(0), seq = hidden.size(1), heads = dims_.num_heads, head_dim = dims_.head_dim;
    const int64_t half = head_dim / 2, groups = heads / dims_.num_kv_heads;
    at::Tensor q = at::linear(hidden, q_proj_).view({batch, seq, heads, head_dim});              // [B, S, h, D]
    at::Tensor k = at::linear(hidden, k_proj_).view({batch, seq, dims_.num_kv_heads, head_dim});  // [B, S, kv, D]
    at::Tensor v = at::linear(hidden, v_proj_).view({batch, seq, dims_.num_kv_heads, head_dim});  // [B, S, kv, D]
    if (groups > 1) k = k.repeat_interleave(groups, 2), v = v.repeat_interleave(groups, 2);       // [B, S, h, D]
    auto half_of = [&](const at::Tensor& x, int64_t which) {  // RoPE on one half: [B, h, S, D/2]
      return apply_rope(x.narrow(-1, which * half, half), positions, rope_).transpose(1, 2);
    };
    at::Tensor mask = at::ones({seq, seq}, hidden.options().dtype(at::kBool)).tril();  // [S, S]
    auto softmax_map = [&](const at::Tensor& query, const at::Tensor& key) {           // [B, h, S, S]
      at::Tensor scores = at::matmul(query, key.transpose(-1, -2)) / std::sqrt(static_cast<double>(half));
      return at::softmax(scores.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity()), -1);
    };
    at::Tensor lambda = at::exp((lambda_q1_ * lambda_k1_).sum()) - at::exp((lambda_q2_ * lambda_k2_).sum()) + lambda_init_;
    at::Tensor map = softmax_map(half_of(q, 0), half_of(k, 0)) - lambda * softmax_map(half_of(q, 1), half_of(k, 1));
    at::Tensor out = at::matmul(map, v.transpose(1, 2));                                     // [B, h, S, D]
    out = rms_norm(out, at::ones({head_dim}, out.options()), 1e-5) * (1.0 - lambda_init_);
    return at::linear(out.transpose(1, 2).reshape({batch, seq, heads * head_dim}), o_proj_);  // [B, S, H]
  }

  std::vector<Parameter> parameters() override {
    return {{"q_proj", q_proj_, true},        {"k_proj", k_proj_, true},        {"v_proj", v_proj_, true},
            {"o_proj", o_proj_, true},        {"lambda_q1", lambda_q1_, false}, {"lambda_k1", lambda_k1_, false},
            {"lambda_q2", lambda_q2_, false}, {"lambda_k2", lambda_k2_, false}};
  }

 private:
  ModelDims dims_;
  Rope rope_;
  double lambda_init_ = 0.2;
  at::Tensor q_proj_, k_proj_, v_proj_, o_proj_;                // [h D, H], [kv D, H], [kv D, H], [H, h D]
  at::Tensor lambda_q1_, lambda_k1_, lambda_q2_, lambda_k2_;  // [D / 2]
};

}  // namespace

std::unique_ptr<Attention> make_diff_attn_attention(Options& options, const PluginContext& context) {
  if (context.dims.head_dim % 4 != 0 || context.dims.num_heads % context.dims.num_kv_heads != 0)
    throw Error("diff_attn needs head_dim divisible by 4 (two halves, each with rotary pairs) and num_kv_heads dividing num_heads");
  return std::make_unique<DifferentialAttention>(options, context);
}

}  // namespace pithtrain
