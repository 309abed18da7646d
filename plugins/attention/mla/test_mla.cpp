// mla against a naive reference: explicit latent projections, interleaved RoPE element by element,
// masked softmax(QK^T / sqrt(n + r)) V per head.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "pithtrain/attention.h"

using namespace pithtrain;

namespace {

at::Tensor naive_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return x / at::sqrt(x.pow(2).mean(-1, true) + eps) * weight;
}

// Rotates adjacent pairs (2i, 2i + 1) of x [B, S, heads, r] by position * theta^(-2i/r).
at::Tensor naive_rope_interleaved(const at::Tensor& x, double theta) {
  at::Tensor out = x.clone();
  const int64_t r = x.size(3);
  for (int64_t b = 0; b < x.size(0); ++b)
    for (int64_t s = 0; s < x.size(1); ++s)
      for (int64_t h = 0; h < x.size(2); ++h)
        for (int64_t i = 0; i < r / 2; ++i) {
          double angle = s * std::pow(theta, -2.0 * i / r), a = x[b][s][h][2 * i].item<double>(), c = x[b][s][h][2 * i + 1].item<double>();
          out[b][s][h][2 * i] = a * std::cos(angle) - c * std::sin(angle);
          out[b][s][h][2 * i + 1] = a * std::sin(angle) + c * std::cos(angle);
        }
  return out;
}

void compare(int64_t q_lora_rank) {
  at::manual_seed(q_lora_rank);
  PluginContext context;
  context.dims = {.hidden_size = 12, .num_layers = 1, .num_heads = 3, .num_kv_heads = 3, .head_dim = 4, .rope_theta = 50.0, .init_std = 0.3};
  context.dtype = at::kDouble;
  Options options = Options::from_string("q_lora_rank = " + std::to_string(q_lora_rank) +
                                             "\nkv_lora_rank = 6\nqk_nope_head_dim = 4\nqk_rope_head_dim = 2\nv_head_dim = 5\n",
                                         "test.toml");
  auto attention = pithtrain_plugin()->make_attention(options, context);
  const int64_t batch = 2, seq = 5, heads = 3, nope = 4, rope = 2, v_dim = 5, latent_rank = 6;
  at::Tensor x = at::randn({batch, seq, 12}, at::kDouble);
  at::Tensor out = attention->forward(x, at::arange(seq, at::kLong));

  std::map<std::string, at::Tensor> p;
  for (auto& parameter : attention->parameters()) p[parameter.name] = parameter.tensor.detach();
  at::Tensor q = q_lora_rank == 0 ? at::matmul(x, p["q_proj"].t())
                                  : at::matmul(naive_rms_norm(at::matmul(x, p["q_a_proj"].t()), p["q_a_norm"], 1e-6), p["q_b_proj"].t());
  q = q.view({batch, seq, heads, nope + rope});
  at::Tensor compressed = at::matmul(x, p["kv_a_proj"].t());
  at::Tensor latent = naive_rms_norm(compressed.narrow(-1, 0, latent_rank), p["kv_a_norm"], 1e-6);
  at::Tensor kv = at::matmul(latent, p["kv_b_proj"].t()).view({batch, seq, heads, nope + v_dim});
  at::Tensor k_rope = naive_rope_interleaved(compressed.narrow(-1, latent_rank, rope).unsqueeze(2), 50.0);
  at::Tensor q_rope = naive_rope_interleaved(q.narrow(-1, nope, rope).contiguous(), 50.0);
  at::Tensor expected_heads = at::zeros({batch, seq, heads, v_dim}, at::kDouble);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t s = 0; s < seq; ++s) {
        std::vector<double> scores(s + 1);
        double max_score = -1e300, total = 0;
        for (int64_t t = 0; t <= s; ++t) {
          double score = at::dot(q[b][s][h].narrow(0, 0, nope), kv[b][t][h].narrow(0, 0, nope)).item<double>() +
                         at::dot(q_rope[b][s][h], k_rope[b][t][0]).item<double>();
          scores[t] = score / std::sqrt(double(nope + rope));
          max_score = std::max(max_score, scores[t]);
        }
        for (auto& score : scores) total += score = std::exp(score - max_score);
        for (int64_t t = 0; t <= s; ++t) expected_heads[b][s][h] += scores[t] / total * kv[b][t][h].narrow(0, nope, v_dim);
      }
  at::Tensor expected = at::matmul(expected_heads.view({batch, seq, heads * v_dim}), p["o_proj"].t());
  EXPECT_TRUE(at::allclose(out, expected, 1e-12, 1e-12)) << (out - expected).abs().max();
}

}  // namespace

TEST(MultiHeadLatentAttention, WithoutQueryCompressionMatchesNaive) { compare(0); }
TEST(MultiHeadLatentAttention, WithQueryCompressionMatchesNaive) { compare(7); }

// The cache path (pithtrain generate, attention in the latent space): the sequence fed in pieces through
// forward_cached gives, row for row, what forward() gives on the whole sequence.
namespace {

void compare_cached(int64_t q_lora_rank, const std::string& extra = "") {
  at::manual_seed(q_lora_rank + 11);
  PluginContext context;
  context.dims = {.hidden_size = 12, .num_layers = 1, .num_heads = 3, .num_kv_heads = 3, .head_dim = 4, .rope_theta = 50.0, .init_std = 0.3};
  context.dtype = at::kDouble;
  Options options = Options::from_string("q_lora_rank = " + std::to_string(q_lora_rank) +
                                             "\nkv_lora_rank = 6\nqk_nope_head_dim = 4\nqk_rope_head_dim = 2\nv_head_dim = 5\n" + extra,
                                         "test.toml");
  auto attention = pithtrain_plugin()->make_attention(options, context);
  options.check_unknown_keys("attention plugin 'mla'");
  ASSERT_TRUE(attention->supports_cache());
  at::NoGradGuard no_grad;
  for (auto& parameter : attention->parameters())  // the norms start at 1: give them values that matter
    if (parameter.tensor.dim() == 1) parameter.tensor.normal_(1.0, 0.5);
  const int64_t batch = 2, seq = 8;
  at::Tensor x = at::randn({batch, seq, 12}, at::kDouble);
  at::Tensor whole = attention->forward(x, at::arange(seq, at::kLong));  // [B, S, H]
  AttentionCache cache;
  std::vector<at::Tensor> pieces;
  for (int64_t start = 0; int64_t piece : {3, 1, 2, 1, 1}) {
    pieces.push_back(attention->forward_cached(x.narrow(1, start, piece), at::arange(start, start + piece, at::kLong), cache));
    cache.length = start += piece;
  }
  ASSERT_EQ(cache.tensors.size(), 2u);
  EXPECT_EQ(cache.tensors[0].sizes(), at::IntArrayRef({batch, seq, 6}));  // the latent, not per-head keys
  at::Tensor cached = at::cat(pieces, 1);
  EXPECT_TRUE(at::allclose(cached, whole, 1e-12, 1e-12)) << (cached - whole).abs().max();
}

}  // namespace

TEST(MultiHeadLatentAttention, CacheMatchesForwardWithoutQueryCompression) { compare_cached(0); }
TEST(MultiHeadLatentAttention, CacheMatchesForwardWithQueryCompression) { compare_cached(7); }
TEST(MultiHeadLatentAttention, CacheMatchesForwardWithYarn) {
  compare_cached(7, "rope_scaling = \"yarn\"\nrope_factor = 4.0\nrope_original_max_positions = 4\nrope_mscale_all_dim = 1.0\n");
}
