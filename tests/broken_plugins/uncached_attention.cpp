// An attention plugin without a cache path (Attention::supports_cache keeps its default, false), so the
// generate tests see the core's fallback: the whole prefix recomputed for each new token. Causal
// multi-head attention without position embeddings: q, k, v and o projections around SDPA.
#include <ATen/ATen.h>

#include "pithtrain/attention.h"
#include "pithtrain/nn.h"

namespace {

class UncachedAttention final : public pithtrain::Attention {
 public:
  explicit UncachedAttention(const pithtrain::PluginContext& context) : dims_(context.dims) {
    const int64_t width = dims_.num_heads * dims_.head_dim;
    q_proj_ = pithtrain::normal_parameter({width, dims_.hidden_size}, dims_.init_std, context);
    k_proj_ = pithtrain::normal_parameter({width, dims_.hidden_size}, dims_.init_std, context);
    v_proj_ = pithtrain::normal_parameter({width, dims_.hidden_size}, dims_.init_std, context);
    o_proj_ = pithtrain::normal_parameter({dims_.hidden_size, width}, dims_.init_std, context);
  }

  at::Tensor forward(const at::Tensor& hidden, const at::Tensor& /*positions*/) override {
    const int64_t batch = hidden.size(0), seq = hidden.size(1);
    auto heads = [&](const at::Tensor& weight) {  // [B, S, H] -> [B, h, S, D]
      return at::linear(hidden, weight).view({batch, seq, dims_.num_heads, dims_.head_dim}).transpose(1, 2);
    };
    at::Tensor out = at::scaled_dot_product_attention(heads(q_proj_), heads(k_proj_), heads(v_proj_), {}, 0.0, /*is_causal=*/true);
    return at::linear(out.transpose(1, 2).reshape({batch, seq, dims_.num_heads * dims_.head_dim}), o_proj_);  // [B, S, H]
  }

  std::vector<pithtrain::Parameter> parameters() override {
    return {{"q_proj", q_proj_, true}, {"k_proj", k_proj_, true}, {"v_proj", v_proj_, true}, {"o_proj", o_proj_, true}};
  }

 private:
  pithtrain::ModelDims dims_;
  at::Tensor q_proj_, k_proj_, v_proj_, o_proj_;  // [h * D, H] x 3, [H, h * D]
};

std::unique_ptr<pithtrain::Attention> make_uncached(pithtrain::Options& /*options*/, const pithtrain::PluginContext& context) {
  return std::make_unique<UncachedAttention>(context);
}

}  // namespace

PITHTRAIN_PLUGIN_EXPORT const pithtrain::PluginDescriptor* pithtrain_plugin() {
  static const pithtrain::PluginDescriptor descriptor{
      .abi_version = pithtrain::kPluginAbiVersion,
      .kind = "attention",
      .name = "uncached",
      .version = "0.1.0",
      .description = "test plugin: causal attention without a cache path (generate's fallback)",
      .torch_version = pithtrain::kTorchVersion,
      .make_attention = &make_uncached,
  };
  return &descriptor;
}
