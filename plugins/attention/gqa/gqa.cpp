// GroupedQueryAttention: causal multi-head / grouped-query attention with rotary position embeddings,
// optionally with RMSNorm on queries and keys (per head as Qwen3, or over the projection as OLMoE).
#include <ATen/ATen.h>

#include "pithtrain/attention.h"
#include "pithtrain/nn.h"

namespace pithtrain {
namespace {

class GroupedQueryAttention final : public Attention {
 public:
  GroupedQueryAttention(Options& options, const PluginContext& context) : dims_(context.dims) {
    const int64_t hidden = dims_.hidden_size, head_dim = dims_.head_dim;
    qk_norm_ = options.text("qk_norm", "none");
    qk_norm_eps_ = options.number("qk_norm_eps", 1e-6);
    if (qk_norm_ != "none" && qk_norm_ != "head" && qk_norm_ != "full")
      throw Error(options.where("qk_norm") + ": qk_norm must be \"none\", \"head\" (Qwen3: RMSNorm over each head) or "
                  "\"full\" (OLMoE: RMSNorm over the whole projection), got \"" + qk_norm_ + "\"");
    if (qk_norm_ != "none") {
      auto ones = at::TensorOptions().dtype(context.dtype).device(context.device);
      q_norm_ = at::ones({qk_norm_ == "head" ? head_dim : dims_.num_heads * head_dim}, ones).requires_grad_(true);
      k_norm_ = at::ones({qk_norm_ == "head" ? head_dim : dims_.num_kv_heads * head_dim}, ones).requires_grad_(true);
    }
    q_proj_ = normal_parameter({dims_.num_heads * head_dim, hidden}, dims_.init_std, context);
    k_proj_ = normal_parameter({dims_.num_kv_heads * head_dim, hidden}, dims_.init_std, context);
    v_proj_ = normal_parameter({dims_.num_kv_heads * head_dim, hidden}, dims_.init_std, context);
    o_proj_ = normal_parameter({hidden, dims_.num_heads * head_dim},
                               dims_.init_std / std::sqrt(2.0 * std::max<int64_t>(1, dims_.num_layers)), context);
  }

  at::Tensor forward(const at::Tensor& hidden, const at::Tensor& positions) override {
    const int64_t batch = hidden.size(0), seq = hidden.size(1), head_dim = dims_.head_dim;
    at::Tensor q = at::linear(hidden, q_proj_);  // [B, S, h * D]
    at::Tensor k = at::linear(hidden, k_proj_);  // [B, S, kv * D]
    if (qk_norm_ == "full") q = rms_norm(q, q_norm_, qk_norm_eps_), k = rms_norm(k, k_norm_, qk_norm_eps_);
    q = q.view({batch, seq, dims_.num_heads, head_dim});     // [B, S, h, D]
    k = k.view({batch, seq, dims_.num_kv_heads, head_dim});  // [B, S, kv, D]
    if (qk_norm_ == "head") q = rms_norm(q, q_norm_, qk_norm_eps_), k = rms_norm(k, k_norm_, qk_norm_eps_);
    at::Tensor v = at::linear(hidden, v_proj_).view({batch, seq, dims_.num_kv_heads, head_dim});  // [B, S, kv, D]
    q = apply_rope(q, positions, dims_.rope_theta).transpose(1, 2);  // [B, h, S, D]
    k = apply_rope(k, positions, dims_.rope_theta).transpose(1, 2);  // [B, kv, S, D]
    v = v.transpose(1, 2);                                           // [B, kv, S, D]
    at::Tensor out = at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true, std::nullopt,
                                                      /*enable_gqa=*/dims_.num_kv_heads != dims_.num_heads);
    return at::linear(out.transpose(1, 2).reshape({batch, seq, dims_.num_heads * head_dim}), o_proj_);  // [B, S, H]
  }

  std::vector<Parameter> parameters() override {
    std::vector<Parameter> result = {{"q_proj", q_proj_, true}, {"k_proj", k_proj_, true}, {"v_proj", v_proj_, true},
                                     {"o_proj", o_proj_, true}};
    if (q_norm_.defined()) result.push_back({"q_norm", q_norm_, false}), result.push_back({"k_norm", k_norm_, false});
    return result;
  }

 private:
  ModelDims dims_;
  at::Tensor q_proj_;  // [h * D, H]
  at::Tensor k_proj_;  // [kv * D, H]
  at::Tensor v_proj_;  // [kv * D, H]
  at::Tensor o_proj_;  // [H, h * D]
  std::string qk_norm_ = "none";
  double qk_norm_eps_ = 1e-6;
  at::Tensor q_norm_, k_norm_;  // [D] ("head") or [h * D], [kv * D] ("full")
};

}  // namespace

std::unique_ptr<Attention> make_gqa_attention(Options& options, const PluginContext& context) {
  if (context.dims.num_heads % context.dims.num_kv_heads != 0)
    throw Error("num_heads (" + std::to_string(context.dims.num_heads) + ") must be a multiple of num_kv_heads (" +
                std::to_string(context.dims.num_kv_heads) + ")");
  return std::make_unique<GroupedQueryAttention>(options, context);
}

}  // namespace pithtrain
