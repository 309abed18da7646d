// gqa against a naive attention written element by element: explicit RoPE (plain or YaRN), repeated
// key/value heads, biases, a causal (optionally windowed) mask, the softmax with a sink term, the output
// gate's rows and partial rotary dimensions.
#include <gtest/gtest.h>

#include <cmath>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "pithtrain/attention.h"

using namespace pithtrain;

namespace {

struct Case {
  int64_t heads = 3, kv_heads = 3;
  bool bias = false, sinks = false, yarn = false;
  int64_t window = 0;
  std::string window_layers = "all";
  int64_t layer_index = 0;
  bool gate = false;            // output_gate: q_proj rows per head [query D, gate D]
  double rotary_fraction = 1.0;  // partial_rotary_factor
  int64_t head_dim = 4;          // wider for partial rotary, so the rotated part has more than one frequency
  bool qkv_bias = false;         // biases on q, k, v only (GLM-4.5)
};

// YaRN's inverse frequency of rotary pair i for head width d, from the paper's formulas one scalar at a time.
double yarn_inverse_frequency(int64_t i, int64_t d, double theta, double factor, double original, double beta_fast,
                              double beta_slow) {
  auto dimension_of = [&](double rotations) { return d * std::log(original / (rotations * 2 * M_PI)) / (2 * std::log(theta)); };
  double low = std::max(std::floor(dimension_of(beta_fast)), 0.0), high = std::min(std::ceil(dimension_of(beta_slow)), d - 1.0);
  if (low == high) high += 0.001;
  double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);  // 0: keep the frequency, 1: divide it by factor
  double base = std::pow(theta, -2.0 * i / d);
  return base * (1 - ramp) + base / factor * ramp;
}

// Rotates pairs (i, i + d/2) of the first d dimensions of x [B, S, heads, D] (all D unless d given) by
// position * inverse_frequency(i), times `scale`; dimensions from d on are left as they are.
at::Tensor naive_rope(const at::Tensor& x, const std::function<double(int64_t)>& inverse_frequency, double scale, int64_t d = 0) {
  at::Tensor out = x.clone();
  const int64_t seq = x.size(1), heads = x.size(2);
  if (d == 0) d = x.size(3);
  for (int64_t b = 0; b < x.size(0); ++b)
    for (int64_t s = 0; s < seq; ++s)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < d / 2; ++i) {
          double angle = s * inverse_frequency(i);
          double a = x[b][s][h][i].item<double>(), c = x[b][s][h][i + d / 2].item<double>();
          out[b][s][h][i] = scale * (a * std::cos(angle) - c * std::sin(angle));
          out[b][s][h][i + d / 2] = scale * (c * std::cos(angle) + a * std::sin(angle));
        }
  return out;
}

void compare(const Case& c) {
  at::manual_seed(c.heads * 10 + c.kv_heads + c.window);
  const int64_t heads = c.heads, kv_heads = c.kv_heads, batch = 2, seq = 6, d = c.head_dim;
  PluginContext context;
  context.dims = {.hidden_size = 12, .num_layers = 1, .num_heads = heads, .num_kv_heads = kv_heads, .head_dim = d,
                  .rope_theta = 100.0, .init_std = 0.4};
  context.dtype = at::kDouble;
  context.layer_index = c.layer_index;
  std::string toml = std::string("bias = ") + (c.bias ? "true" : "false") + "\nsinks = " + (c.sinks ? "true" : "false") +
                     "\nsliding_window = " + std::to_string(c.window) + "\nsliding_window_layers = \"" + c.window_layers + "\"\n";
  if (c.yarn) toml += "rope_scaling = \"yarn\"\nrope_factor = 8.0\nrope_original_max_positions = 64\nrope_beta_fast = 4.0\n";
  toml += std::string("output_gate = ") + (c.gate ? "true" : "false") + "\npartial_rotary_factor = " + std::to_string(c.rotary_fraction) + "\n";
  if (c.qkv_bias) toml += "qkv_bias = true\n";
  Options options = Options::from_string(toml, "test.toml");
  auto attention = pithtrain_plugin()->make_attention(options, context);
  options.check_unknown_keys("attention plugin 'gqa'");
  auto p = attention->parameters();
  ASSERT_EQ(p.size(), 4u + (c.bias ? 4 : c.qkv_bias ? 3 : 0) + (c.sinks ? 1 : 0));
  {
    at::NoGradGuard no_grad;  // biases and sinks start at zero; give them values that matter
    for (size_t i = 4; i < p.size(); ++i) p[i].tensor.normal_(0.0, 1.0);
  }
  at::Tensor x = at::randn({batch, seq, 12}, at::kDouble);
  at::Tensor out = attention->forward(x, at::arange(seq, at::kLong));

  auto weight = [&](size_t i) { return p[i].tensor.detach(); };
  auto bias = [&](size_t i) {  // of q, k, v, o (i = 0..3); qkv_bias has none for o
    return c.bias || (c.qkv_bias && i < 3) ? weight(4 + i) : at::zeros({weight(i).size(0)}, at::kDouble);
  };
  const int64_t rotary = static_cast<int64_t>(d * c.rotary_fraction);  // rotated dimensions per head
  std::function<double(int64_t)> inverse_frequency = [&](int64_t i) { return std::pow(100.0, -2.0 * i / rotary); };
  double scale = 1.0;
  if (c.yarn) {
    inverse_frequency = [&](int64_t i) { return yarn_inverse_frequency(i, rotary, 100.0, 8.0, 64.0, 4.0, 1.0); };
    scale = 0.1 * std::log(8.0) + 1;
  }
  at::Tensor q_and_gate = (at::matmul(x, weight(0).t()) + bias(0)).view({batch, seq, heads, c.gate ? 2 * d : d});
  at::Tensor gate = c.gate ? q_and_gate.narrow(-1, d, d) : at::Tensor();  // [B, S, h, d]: rows d..2d-1 of each head
  at::Tensor q = naive_rope(q_and_gate.narrow(-1, 0, d), inverse_frequency, scale, rotary);
  at::Tensor k = naive_rope((at::matmul(x, weight(1).t()) + bias(1)).view({batch, seq, kv_heads, d}), inverse_frequency, scale, rotary);
  at::Tensor v = (at::matmul(x, weight(2).t()) + bias(2)).view({batch, seq, kv_heads, d});
  const bool windowed = c.window > 0 && (c.window_layers == "all" || (c.window_layers == "even") == (c.layer_index % 2 == 0));
  at::Tensor context_out = at::zeros({batch, seq, heads, d}, at::kDouble);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      int64_t g = h / (heads / kv_heads);  // the key/value head this query head shares
      double sink = c.sinks ? p.back().tensor[h].item<double>() : -1e300;
      for (int64_t s = 0; s < seq; ++s) {
        int64_t first = windowed ? std::max<int64_t>(0, s - c.window + 1) : 0;
        std::vector<double> scores(s + 1);
        double max_score = sink, total = 0;
        for (int64_t t = first; t <= s; ++t) {
          scores[t] = at::dot(q[b][s][h], k[b][t][g]).item<double>() / std::sqrt(double(d));
          max_score = std::max(max_score, scores[t]);
        }
        if (c.sinks) total += std::exp(sink - max_score);
        for (int64_t t = first; t <= s; ++t) total += scores[t] = std::exp(scores[t] - max_score);
        for (int64_t t = first; t <= s; ++t) context_out[b][s][h] += scores[t] / total * v[b][t][g];
      }
    }
  if (c.gate) context_out = context_out / (1 + at::exp(-gate));
  at::Tensor expected = at::matmul(context_out.view({batch, seq, heads * d}), weight(3).t()) + bias(3);
  EXPECT_TRUE(at::allclose(out, expected, 1e-12, 1e-12)) << (out - expected).abs().max();
}

}  // namespace

TEST(GroupedQueryAttention, MultiHeadMatchesNaive) { compare({.heads = 3, .kv_heads = 3}); }
TEST(GroupedQueryAttention, GroupedQueryMatchesNaive) { compare({.heads = 3, .kv_heads = 1}); }
TEST(GroupedQueryAttention, TwoGroupsMatchNaive) { compare({.heads = 4, .kv_heads = 2}); }
TEST(GroupedQueryAttention, BiasesMatchNaive) { compare({.heads = 4, .kv_heads = 2, .bias = true}); }
TEST(GroupedQueryAttention, SlidingWindowMatchesNaive) { compare({.heads = 4, .kv_heads = 2, .window = 3}); }
TEST(GroupedQueryAttention, SinksMatchNaive) { compare({.heads = 4, .kv_heads = 2, .sinks = true}); }
TEST(GroupedQueryAttention, GptOssEvenLayerSinksAndWindowMatchNaive) {
  compare({.heads = 4, .kv_heads = 2, .bias = true, .sinks = true, .window = 2, .window_layers = "even", .layer_index = 2});
}
TEST(GroupedQueryAttention, GptOssOddLayerIsFullAttention) {
  compare({.heads = 4, .kv_heads = 2, .bias = true, .sinks = true, .window = 2, .window_layers = "even", .layer_index = 1});
}
TEST(GroupedQueryAttention, YarnMatchesItsFormula) { compare({.heads = 4, .kv_heads = 2, .yarn = true}); }

TEST(GroupedQueryAttention, OutputGateMatchesNaive) { compare({.heads = 4, .kv_heads = 2, .gate = true}); }
TEST(GroupedQueryAttention, OutputGateWithBiasesMatchesNaive) { compare({.heads = 4, .kv_heads = 2, .bias = true, .gate = true}); }
TEST(GroupedQueryAttention, PartialRotaryMatchesNaive) {
  compare({.heads = 4, .kv_heads = 2, .rotary_fraction = 0.5, .head_dim = 8});  // 4 of 8 dimensions rotate
}
TEST(GroupedQueryAttention, Glm4MoeQkvBiasesAndPartialRotaryMatchNaive) {  // q/k/v biases, none on o_proj; half rotated
  compare({.heads = 4, .kv_heads = 2, .rotary_fraction = 0.5, .head_dim = 8, .qkv_bias = true});
}
TEST(GroupedQueryAttention, QkvBiasNamesItsTensorsAndIsRefusedWithBias) {
  PluginContext context;
  context.dims = {.hidden_size = 12, .num_layers = 1, .num_heads = 4, .num_kv_heads = 2, .head_dim = 4};
  Options options = Options::from_string("qkv_bias = true\n", "test.toml");
  std::vector<std::string> names;
  for (const auto& parameter : pithtrain_plugin()->make_attention(options, context)->parameters()) names.push_back(parameter.name);
  EXPECT_EQ(names, (std::vector<std::string>{"q_proj", "k_proj", "v_proj", "o_proj", "q_proj_bias", "k_proj_bias", "v_proj_bias"}));
  Options both = Options::from_string("bias = true\nqkv_bias = true\n", "test.toml");
  try {
    pithtrain_plugin()->make_attention(both, context);
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("test.toml:2: qkv_bias = "), std::string::npos) << error.what();
  }
}
TEST(GroupedQueryAttention, Qwen3NextFullAttentionMatchesNaive) {  // gate, partial rotary (0.25 as Qwen3-Next) and YaRN
  compare({.heads = 4, .kv_heads = 2, .yarn = true, .gate = true, .rotary_fraction = 0.25, .head_dim = 16});
}

TEST(GroupedQueryAttention, GateAndPartialRotaryDefaultOff) {
  PluginContext context;
  context.dims = {.hidden_size = 12, .num_layers = 1, .num_heads = 3, .num_kv_heads = 3, .head_dim = 4};
  Options options = Options::from_string("", "test.toml");
  auto plain = pithtrain_plugin()->make_attention(options, context);
  EXPECT_EQ(plain->parameters().front().tensor.sizes().vec(), (std::vector<int64_t>{12, 12})) << "q_proj [h * D, H]";
  Options gated_options = Options::from_string("output_gate = true\n", "test.toml");
  auto gated = pithtrain_plugin()->make_attention(gated_options, context);
  EXPECT_EQ(gated->parameters().front().tensor.sizes().vec(), (std::vector<int64_t>{24, 12})) << "q_proj [h * 2D, H]";
  // A fraction that leaves an odd number of rotated dimensions, or none, is refused at its line.
  for (const char* toml : {"\npartial_rotary_factor = 0.25\n", "\npartial_rotary_factor = 0.75\n", "\npartial_rotary_factor = 0\n"}) {
    Options bad = Options::from_string(toml, "test.toml");
    try {
      pithtrain_plugin()->make_attention(bad, context);
      ADD_FAILURE() << "expected an error for" << toml;
    } catch (const Error& error) {
      EXPECT_NE(std::string(error.what()).find("test.toml:2: partial_rotary_factor = "), std::string::npos) << error.what();
    }
  }
}

TEST(GroupedQueryAttention, RejectsABadWindowLayerPattern) {
  PluginContext context;
  context.dims = {.hidden_size = 12, .num_layers = 1, .num_heads = 3, .num_kv_heads = 3, .head_dim = 4};
  Options options = Options::from_string("sliding_window = 4\nsliding_window_layers = \"every_other\"\n", "test.toml");
  try {
    pithtrain_plugin()->make_attention(options, context);
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("test.toml:2"), std::string::npos) << error.what();
  }
}

TEST(GroupedQueryAttention, ZeroCenteredQkNormScalesByOnePlusWeight) {
  // Qwen3-Next's q_norm / k_norm: a zero-centred weight w must act as a plain norm weight 1 + w, forward and
  // backward, and start at zero (the identity), for both norm shapes.
  for (const char* shape : {"head", "full"}) {
    PluginContext context;
    context.dims = {.hidden_size = 12, .num_layers = 1, .num_heads = 4, .num_kv_heads = 2, .head_dim = 8, .init_std = 0.4};
    context.dtype = at::kDouble;
    const std::string common = std::string("qk_norm = \"") + shape + "\"\noutput_gate = true\npartial_rotary_factor = 0.25\n";
    Options centred_options = Options::from_string(common + "qk_norm_zero_centered = true\n", "test.toml");
    Options plain_options = Options::from_string(common, "test.toml");
    auto centred = pithtrain_plugin()->make_attention(centred_options, context);
    auto plain = pithtrain_plugin()->make_attention(plain_options, context);
    auto c = centred->parameters(), p = plain->parameters();
    ASSERT_EQ(c.size(), 6u);
    ASSERT_EQ(c[4].name, "q_norm");
    EXPECT_TRUE(at::equal(c[4].tensor, at::zeros_like(c[4].tensor))) << "zero-centred norms start at zero";
    {
      at::NoGradGuard no_grad;
      for (size_t i = 0; i < 4; ++i) p[i].tensor.copy_(c[i].tensor);
      for (size_t i = 4; i < 6; ++i) c[i].tensor.normal_(0.0, 0.5), p[i].tensor.copy_(c[i].tensor + 1.0);
    }
    at::manual_seed(7);
    at::Tensor x = at::randn({2, 5, 12}, at::kDouble);
    at::Tensor out_centred = centred->forward(x, at::arange(5, at::kLong)), out_plain = plain->forward(x, at::arange(5, at::kLong));
    EXPECT_TRUE(at::allclose(out_centred, out_plain, 1e-13, 1e-13)) << shape << ": " << (out_centred - out_plain).abs().max();
    (out_centred.square().sum() + out_plain.square().sum()).backward();
    for (size_t i = 4; i < 6; ++i)
      EXPECT_TRUE(at::allclose(c[i].tensor.grad(), p[i].tensor.grad(), 1e-12, 1e-12)) << shape << " " << c[i].name;
  }
  PluginContext context;
  context.dims = {.hidden_size = 12, .num_layers = 1, .num_heads = 3, .num_kv_heads = 3, .head_dim = 4};
  Options bad = Options::from_string("qk_norm_zero_centered = true\n", "test.toml");
  try {
    pithtrain_plugin()->make_attention(bad, context);
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("test.toml:1: qk_norm_zero_centered"), std::string::npos) << error.what();
  }
}

// The cache path (pithtrain generate): the sequence fed in pieces through forward_cached gives, row for
// row, what forward() gives on the whole sequence, for every option; with a window, over more tokens
// than the window, so the trimmed cache is exercised.
namespace {

void compare_cached(const std::string& toml, int64_t heads, int64_t kv_heads, int64_t layer_index = 0) {
  at::manual_seed(heads * 7 + kv_heads);
  PluginContext context;
  context.dims = {.hidden_size = 12, .num_layers = 1, .num_heads = heads, .num_kv_heads = kv_heads, .head_dim = 4,
                  .rope_theta = 100.0, .init_std = 0.4};
  context.dtype = at::kDouble;
  context.layer_index = layer_index;
  Options options = Options::from_string(toml, "test.toml");
  auto attention = pithtrain_plugin()->make_attention(options, context);
  options.check_unknown_keys("attention plugin 'gqa'");
  ASSERT_TRUE(attention->supports_cache());
  at::NoGradGuard no_grad;
  for (auto& parameter : attention->parameters())  // norms, biases and sinks start at 1 or 0: give them values that matter
    if (parameter.tensor.dim() == 1) parameter.tensor.normal_(0.5, 1.0);
  const int64_t batch = 2, seq = 9;
  at::Tensor x = at::randn({batch, seq, 12}, at::kDouble);
  at::Tensor whole = attention->forward(x, at::arange(seq, at::kLong));  // [B, S, H]
  AttentionCache cache;
  std::vector<at::Tensor> pieces;
  for (int64_t start = 0; int64_t piece : {3, 1, 1, 2, 1, 1}) {  // a prompt of 3, then single tokens and a pair
    pieces.push_back(attention->forward_cached(x.narrow(1, start, piece), at::arange(start, start + piece, at::kLong), cache));
    cache.length = start += piece;
  }
  at::Tensor cached = at::cat(pieces, 1);
  EXPECT_TRUE(at::allclose(cached, whole, 1e-12, 1e-12)) << toml << ": " << (cached - whole).abs().max();
}

}  // namespace

TEST(GroupedQueryAttention, CacheMatchesForwardMultiHead) { compare_cached("", 3, 3); }
TEST(GroupedQueryAttention, CacheMatchesForwardGroupedQuery) { compare_cached("", 4, 2); }
TEST(GroupedQueryAttention, CacheMatchesForwardWithQkNorms) {
  compare_cached("qk_norm = \"head\"\n", 4, 2);
  compare_cached("qk_norm = \"full\"\n", 4, 1);
}
TEST(GroupedQueryAttention, CacheMatchesForwardQwen3NextLayers) {  // the output gate, partial rotary, zero-centred norms
  compare_cached("output_gate = true\npartial_rotary_factor = 0.5\nqk_norm = \"head\"\nqk_norm_zero_centered = true\n", 4, 2);
  compare_cached("output_gate = true\npartial_rotary_factor = 0.5\n", 4, 1);
}
TEST(GroupedQueryAttention, CacheMatchesForwardWithSlidingWindow) {
  compare_cached("sliding_window = 3\n", 4, 2);
  compare_cached("sliding_window = 1\n", 4, 2);
}
TEST(GroupedQueryAttention, CacheMatchesForwardGptOssLayers) {
  const std::string gpt_oss = "bias = true\nsinks = true\nsliding_window = 2\nsliding_window_layers = \"even\"\n"
                              "rope_scaling = \"yarn\"\nrope_factor = 8.0\nrope_original_max_positions = 64\n";
  compare_cached(gpt_oss, 4, 2, /*layer_index=*/0);  // windowed
  compare_cached(gpt_oss, 4, 2, /*layer_index=*/1);  // full attention with sinks
}
