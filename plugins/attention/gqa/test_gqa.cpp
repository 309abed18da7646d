// gqa against a naive attention: explicit RoPE, repeated key/value heads, masked softmax(QK^T/sqrt(d))V.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include "pithtrain/attention.h"

using namespace pithtrain;

namespace {

// Rotates pairs (i, i + d/2) of x [B, S, heads, d] by position * theta^(-2i/d), element by element.
at::Tensor naive_rope(const at::Tensor& x, double theta) {
  at::Tensor out = x.clone();
  const int64_t seq = x.size(1), heads = x.size(2), d = x.size(3);
  for (int64_t b = 0; b < x.size(0); ++b)
    for (int64_t s = 0; s < seq; ++s)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < d / 2; ++i) {
          double angle = s * std::pow(theta, -2.0 * i / d);
          double a = x[b][s][h][i].item<double>(), c = x[b][s][h][i + d / 2].item<double>();
          out[b][s][h][i] = a * std::cos(angle) - c * std::sin(angle);
          out[b][s][h][i + d / 2] = c * std::cos(angle) + a * std::sin(angle);
        }
  return out;
}

void compare(int64_t heads, int64_t kv_heads) {
  at::manual_seed(heads * 10 + kv_heads);
  PluginContext context;
  context.dims = {.hidden_size = 12, .num_layers = 1, .num_heads = heads, .num_kv_heads = kv_heads, .head_dim = 4,
                  .rope_theta = 100.0, .init_std = 0.4};
  context.dtype = at::kDouble;
  Options options = Options::from_string("", "test.toml");
  auto attention = pithtrain_plugin()->make_attention(options, context);
  const int64_t batch = 2, seq = 5, d = 4;
  at::Tensor x = at::randn({batch, seq, 12}, at::kDouble);
  at::Tensor out = attention->forward(x, at::arange(seq, at::kLong));

  auto p = attention->parameters();
  at::Tensor q = naive_rope(at::matmul(x, p[0].tensor.detach().t()).view({batch, seq, heads, d}), 100.0);
  at::Tensor k = naive_rope(at::matmul(x, p[1].tensor.detach().t()).view({batch, seq, kv_heads, d}), 100.0);
  at::Tensor v = at::matmul(x, p[2].tensor.detach().t()).view({batch, seq, kv_heads, d});
  at::Tensor context_out = at::zeros({batch, seq, heads, d}, at::kDouble);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      int64_t g = h / (heads / kv_heads);  // the key/value head this query head shares
      for (int64_t s = 0; s < seq; ++s) {
        std::vector<double> scores(s + 1);
        double max_score = -1e300, total = 0;
        for (int64_t t = 0; t <= s; ++t) {
          scores[t] = at::dot(q[b][s][h], k[b][t][g]).item<double>() / std::sqrt(double(d));
          max_score = std::max(max_score, scores[t]);
        }
        for (auto& score : scores) total += score = std::exp(score - max_score);
        for (int64_t t = 0; t <= s; ++t) context_out[b][s][h] += scores[t] / total * v[b][t][g];
      }
    }
  at::Tensor expected = at::matmul(context_out.view({batch, seq, heads * d}), p[3].tensor.detach().t());
  EXPECT_TRUE(at::allclose(out, expected, 1e-12, 1e-12)) << (out - expected).abs().max();
}

}  // namespace

TEST(GroupedQueryAttention, MultiHeadMatchesNaive) { compare(3, 3); }
TEST(GroupedQueryAttention, GroupedQueryMatchesNaive) { compare(3, 1); }
TEST(GroupedQueryAttention, TwoGroupsMatchNaive) { compare(4, 2); }
