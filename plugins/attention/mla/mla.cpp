// MultiHeadLatentAttention: DeepSeek-V2's MLA (arXiv:2405.04434, section 2.1). Keys and values come from
// a shared low-rank latent c = RMSNorm(W_dkv x) [kv_lora_rank]; each head's key is [W_uk c ; RoPE(k_rope)]
// with one rotary key k_rope shared by all heads, its value W_uv c; queries are [q_nope ; RoPE(q_rope)],
// optionally through their own low-rank bottleneck (q_lora_rank). Generation caches only c and the rotary key.
#include <ATen/ATen.h>

#include "pithtrain/attention.h"
#include "pithtrain/nn.h"

namespace pithtrain {
namespace {

class MultiHeadLatentAttention final : public Attention {
 public:
  MultiHeadLatentAttention(Options& options, const PluginContext& context) : dims_(context.dims) {
    q_lora_rank_ = options.integer("q_lora_rank", 0, Range::at_least(0));  // 0: no query compression
    kv_lora_rank_ = options.integer("kv_lora_rank", 512, Range::at_least(1));
    nope_dim_ = options.integer("qk_nope_head_dim", 128, Range::at_least(0));
    rope_dim_ = options.integer("qk_rope_head_dim", 64, Range::at_least(2));
    options.require("qk_rope_head_dim", rope_dim_ % 2 == 0, "even (rotary pairs)");
    v_dim_ = options.integer("v_head_dim", 128, Range::at_least(1));
    norm_eps_ = options.number("norm_eps", 1e-6, Range::above(0));
    rope_ = read_rope(options, dims_);
    // DeepSeek with YaRN also sharpens the softmax by yarn_mscale(factor, mscale_all_dim)^2.
    const double mscale_all_dim = options.number("rope_mscale_all_dim", 0.0, Range::at_least(0));
    softmax_scale_ = 1.0 / std::sqrt(static_cast<double>(nope_dim_ + rope_dim_));
    if (rope_.scaling == "yarn" && mscale_all_dim != 0.0)
      softmax_scale_ *= std::pow(yarn_mscale(rope_.factor, mscale_all_dim), 2);
    const int64_t hidden = dims_.hidden_size, heads = dims_.num_heads, qk_dim = nope_dim_ + rope_dim_;
    const double std = dims_.init_std;
    auto ones = [&](int64_t size) {
      return at::ones({size}, at::TensorOptions().dtype(context.dtype).device(context.device)).requires_grad_(true);
    };
    if (q_lora_rank_ == 0) {
      q_proj_ = normal_parameter({heads * qk_dim, hidden}, std, context);
    } else {
      q_a_proj_ = normal_parameter({q_lora_rank_, hidden}, std, context);
      q_a_norm_ = ones(q_lora_rank_);
      q_b_proj_ = normal_parameter({heads * qk_dim, q_lora_rank_}, std, context);
    }
    kv_a_proj_ = normal_parameter({kv_lora_rank_ + rope_dim_, hidden}, std, context);
    kv_a_norm_ = ones(kv_lora_rank_);
    kv_b_proj_ = normal_parameter({heads * (nope_dim_ + v_dim_), kv_lora_rank_}, std, context);
    o_proj_ = normal_parameter({hidden, heads * v_dim_}, std / std::sqrt(2.0 * std::max<int64_t>(1, dims_.num_layers)), context);
  }

  at::Tensor forward(const at::Tensor& hidden, const at::Tensor& positions) override {
    const int64_t batch = hidden.size(0), seq = hidden.size(1), heads = dims_.num_heads;
    at::Tensor q = q_lora_rank_ == 0 ? pithtrain::linear(hidden, q_proj_)
                                     : pithtrain::linear(rms_norm(pithtrain::linear(hidden, q_a_proj_), q_a_norm_, norm_eps_), q_b_proj_);
    q = q.view({batch, seq, heads, nope_dim_ + rope_dim_});                                   // [B, S, h, n + r]
    at::Tensor compressed = pithtrain::linear(hidden, kv_a_proj_);                                    // [B, S, c + r]
    at::Tensor latent = rms_norm(compressed.narrow(-1, 0, kv_lora_rank_), kv_a_norm_, norm_eps_);  // [B, S, c]
    at::Tensor k_rope = compressed.narrow(-1, kv_lora_rank_, rope_dim_).unsqueeze(2);          // [B, S, 1, r]
    at::Tensor kv = pithtrain::linear(latent, kv_b_proj_).view({batch, seq, heads, nope_dim_ + v_dim_});  // [B, S, h, n + v]
    at::Tensor q_rope = apply_rope_interleaved(q.narrow(-1, nope_dim_, rope_dim_), positions, rope_);
    k_rope = apply_rope_interleaved(k_rope, positions, rope_).expand({batch, seq, heads, rope_dim_});
    at::Tensor query = at::cat({q.narrow(-1, 0, nope_dim_), q_rope}, -1).transpose(1, 2);        // [B, h, S, n + r]
    at::Tensor key = at::cat({kv.narrow(-1, 0, nope_dim_), k_rope}, -1).transpose(1, 2);         // [B, h, S, n + r]
    at::Tensor value = kv.narrow(-1, nope_dim_, v_dim_).transpose(1, 2);                         // [B, h, S, v]
    at::Tensor out = at::scaled_dot_product_attention(query, key, value, {}, 0.0, /*is_causal=*/true, softmax_scale_);  // [B, h, S, v]
    return pithtrain::linear(out.transpose(1, 2).reshape({batch, seq, heads * v_dim_}), o_proj_);     // [B, S, H]
  }

  // The cache is what makes MLA cheap to decode: per token only the latent c [kv_lora_rank] and the
  // shared rotary key [qk_rope_head_dim], {latent [B, T, c], k_rope [B, T, r]}, never per-head keys and
  // values. Attention runs in the latent space ("absorbed" W_uk and W_uv): q_nope . (W_uk c) =
  // (W_uk^T q_nope) . c and sum_t p_t W_uv c_t = W_uv sum_t p_t c_t, so the cached latents are never
  // expanded to heads.
  bool supports_cache() const override { return true; }

  at::Tensor forward_cached(const at::Tensor& hidden, const at::Tensor& positions, AttentionCache& cache) override {
    const int64_t batch = hidden.size(0), seq = hidden.size(1), heads = dims_.num_heads;
    at::Tensor q = (q_lora_rank_ == 0 ? pithtrain::linear(hidden, q_proj_)
                                      : pithtrain::linear(rms_norm(pithtrain::linear(hidden, q_a_proj_), q_a_norm_, norm_eps_), q_b_proj_))
                       .view({batch, seq, heads, nope_dim_ + rope_dim_});                                          // [B, S, h, n + r]
    at::Tensor compressed = pithtrain::linear(hidden, kv_a_proj_);                                                  // [B, S, c + r]
    at::Tensor latent = rms_norm(compressed.narrow(-1, 0, kv_lora_rank_), kv_a_norm_, norm_eps_);                   // [B, S, c]
    at::Tensor k_rope = apply_rope_interleaved(compressed.narrow(-1, kv_lora_rank_, rope_dim_).unsqueeze(2), positions, rope_)
                            .squeeze(2);                                                                           // [B, S, r]
    if (!cache.tensors.empty()) latent = at::cat({cache.tensors[0], latent}, 1), k_rope = at::cat({cache.tensors[1], k_rope}, 1);
    cache.tensors = {latent, k_rope};                                                                               // [B, T, c], [B, T, r]
    const at::Tensor up = kv_b_proj_.view({heads, nope_dim_ + v_dim_, kv_lora_rank_});                              // [h, n + v, c]
    at::Tensor q_latent = at::einsum("bshn,hnc->bhsc", {q.narrow(-1, 0, nope_dim_), up.narrow(1, 0, nope_dim_)});  // [B, h, S, c]
    at::Tensor q_rope = apply_rope_interleaved(q.narrow(-1, nope_dim_, rope_dim_), positions, rope_).transpose(1, 2);  // [B, h, S, r]
    at::Tensor query = at::cat({q_latent, q_rope}, -1);                                                              // [B, h, S, c + r]
    at::Tensor key = at::cat({latent, k_rope}, -1).unsqueeze(1);                                                     // [B, 1, T, c + r]
    // Query i (position cache.length + i) sees keys 0 .. cache.length + i; one new token sees them all.
    std::optional<at::Tensor> mask;
    if (seq > 1) {
      at::Tensor key_positions = at::arange(latent.size(1), positions.options());  // [T]
      mask = key_positions.unsqueeze(0) <= positions.unsqueeze(1);                  // [S, T]
    }
    at::Tensor out = at::scaled_dot_product_attention(query, key, latent.unsqueeze(1), mask, 0.0, /*is_causal=*/false, softmax_scale_,
                                                      /*enable_gqa=*/true);                                        // [B, h, S, c]
    out = at::einsum("bhsc,hvc->bshv", {out, up.narrow(1, nope_dim_, v_dim_)});                                    // [B, S, h, v]
    return pithtrain::linear(out.reshape({batch, seq, heads * v_dim_}), o_proj_);                                    // [B, S, H]
  }

  std::vector<Parameter> parameters() override {
    std::vector<Parameter> result;
    if (q_lora_rank_ == 0) {
      result.push_back({"q_proj", q_proj_, true});
    } else {
      result.push_back({"q_a_proj", q_a_proj_, true});
      result.push_back({"q_a_norm", q_a_norm_, false});
      result.push_back({"q_b_proj", q_b_proj_, true});
    }
    result.push_back({"kv_a_proj", kv_a_proj_, true});
    result.push_back({"kv_a_norm", kv_a_norm_, false});
    result.push_back({"kv_b_proj", kv_b_proj_, true});
    result.push_back({"o_proj", o_proj_, true});
    return result;
  }

 private:
  ModelDims dims_;
  int64_t q_lora_rank_ = 0, kv_lora_rank_ = 512, nope_dim_ = 128, rope_dim_ = 64, v_dim_ = 128;
  double norm_eps_ = 1e-6, softmax_scale_ = 1.0;
  Rope rope_;
  at::Tensor q_proj_;                        // [h * (n + r), H] without query compression
  at::Tensor q_a_proj_, q_a_norm_, q_b_proj_;  // [q_lora, H], [q_lora], [h * (n + r), q_lora]
  at::Tensor kv_a_proj_;                     // [c + r, H]
  at::Tensor kv_a_norm_;                     // [c]
  at::Tensor kv_b_proj_;                     // [h * (n + v), c]
  at::Tensor o_proj_;                        // [H, h * v]
};

}  // namespace

std::unique_ptr<Attention> make_mla_attention(Options& options, const PluginContext& context) {
  return std::make_unique<MultiHeadLatentAttention>(options, context);
}

}  // namespace pithtrain
