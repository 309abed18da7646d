// gated_deltanet against references written here in double precision: the delta rule as its per-token
// recurrence, the whole layer with an explicit convolution, norms and gate (forward and every gradient),
// and, when tests/test_parity_gated_deltanet.sh passes a reference file, transformers' Qwen3NextGatedDeltaNet.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <map>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include "gated_delta_rule.h"
#include "pithtrain/attention.h"

using namespace pithtrain;

namespace {

// The paper's recurrence one token at a time, per batch row and head: S [dk, dv] starts at zero,
// S <- exp(g) (S - beta k (k^T S)) + beta k v^T, out = S^T q.
at::Tensor naive_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta) {
  const int64_t batch = q.size(0), seq = q.size(1), heads = q.size(2);
  std::vector<at::Tensor> rows;
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<at::Tensor> per_head;
    for (int64_t h = 0; h < heads; ++h) {
      at::Tensor state = at::zeros({q.size(3), v.size(3)}, q.options());
      std::vector<at::Tensor> tokens;
      for (int64_t t = 0; t < seq; ++t) {
        at::Tensor kt = k[b][t][h].unsqueeze(1), vt = v[b][t][h].unsqueeze(0);  // [dk, 1], [1, dv]
        state = g[b][t][h].exp() * (state - beta[b][t][h] * at::matmul(kt, at::matmul(kt.t(), state))) +
                beta[b][t][h] * at::matmul(kt, vt);
        tokens.push_back(at::matmul(state.t(), q[b][t][h]));  // [dv]
      }
      per_head.push_back(at::stack(tokens));  // [S, dv]
    }
    rows.push_back(at::stack(per_head, 1));  // [S, h, dv]
  }
  return at::stack(rows);  // [B, S, h, dv]
}

// max |a - b| relative to max(1, max |b|).
double relative_error(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>() / std::max(1.0, b.abs().max().item<double>());
}

std::vector<at::Tensor> gradients(const at::Tensor& out, const at::Tensor& probe, const std::vector<at::Tensor>& inputs) {
  return torch::autograd::grad({(out * probe).sum()}, inputs, {}, /*retain_graph=*/true);
}

TEST(GatedDeltaRule, ChunkedMatchesTheRecurrenceForwardAndBackward) {
  at::manual_seed(7);
  const int64_t batch = 2, seq = 11, heads = 3, dk = 4, dv = 3;
  auto dbl = at::TensorOptions().dtype(at::kDouble);
  auto unit = [](at::Tensor x) { return x / x.norm(2, -1, true); };
  at::Tensor q = (unit(at::randn({batch, seq, heads, dk}, dbl)) * 0.5).requires_grad_(true);
  at::Tensor k = unit(at::randn({batch, seq, heads, dk}, dbl)).requires_grad_(true);
  at::Tensor v = at::randn({batch, seq, heads, dv}, dbl).requires_grad_(true);
  at::Tensor g = (-at::softplus(at::randn({batch, seq, heads}, dbl))).requires_grad_(true);  // decays in (0, 1)
  at::Tensor beta = at::sigmoid(at::randn({batch, seq, heads}, dbl)).requires_grad_(true);
  const std::vector<at::Tensor> inputs = {q, k, v, g, beta};
  at::Tensor expected = naive_rule(q, k, v, g, beta);
  at::Tensor probe = at::randn(expected.sizes(), dbl);
  std::vector<at::Tensor> expected_grads = gradients(expected, probe, inputs);
  for (int64_t chunk : {1, 3, 4, 11, 64}) {  // one token, a remainder, a divisor-free size, exactly S, more than S
    at::Tensor out = chunked_gated_delta_rule(q, k, v, g, beta, chunk);
    ASSERT_EQ(out.sizes(), expected.sizes());
    double worst = relative_error(out, expected);
    EXPECT_LT(worst, 1e-10) << "chunk " << chunk << ": forward";
    std::vector<at::Tensor> grads = gradients(out, probe, inputs);
    for (size_t i = 0; i < inputs.size(); ++i) {
      const double error = relative_error(grads[i], expected_grads[i]);
      EXPECT_LT(error, 1e-10) << "chunk " << chunk << ": gradient of input " << i;
      worst = std::max(worst, error);
    }
    std::printf("chunk %2lld: max relative error %.3g (forward and gradients)\n", static_cast<long long>(chunk), worst);
  }
}

struct Layer {
  std::unique_ptr<Attention> attention;
  std::map<std::string, at::Tensor> p;
};

PluginContext double_context(int64_t hidden) {
  PluginContext context;
  context.dims = {.hidden_size = hidden, .num_layers = 2, .num_heads = 2, .num_kv_heads = 2, .head_dim = 3, .init_std = 0.4};
  context.dtype = at::kDouble;
  context.layer_index = 0;
  return context;
}

Layer make_layer(const std::string& toml, int64_t hidden) {
  Options options = Options::from_string(toml, "test.toml");
  Layer layer{pithtrain_plugin()->make_attention(options, double_context(hidden)), {}};
  options.check_unknown_keys("attention plugin 'gated_deltanet'");
  for (auto& parameter : layer.attention->parameters()) layer.p[parameter.name] = parameter.tensor;
  return layer;
}

// The layer written out: projections split by explicit row indices, the convolution as a sum over taps,
// the norms and gates from their formulas, the recurrence token by token.
at::Tensor naive_layer(const at::Tensor& x, std::map<std::string, at::Tensor>& p, int64_t nk, int64_t nv, int64_t dk, int64_t dv) {
  const int64_t batch = x.size(0), seq = x.size(1), r = nv / nk, per_key_head = 2 * dk + 2 * r * dv;
  at::Tensor qkvz = at::matmul(x, p["in_proj_qkvz"].t()), ba = at::matmul(x, p["in_proj_ba"].t());
  auto rows = [&](const at::Tensor& y, const std::vector<int64_t>& index) {
    return y.index_select(-1, at::tensor(index, at::kLong));
  };
  std::vector<int64_t> q_rows, k_rows, v_rows, z_rows, b_rows, a_rows;
  for (int64_t h = 0; h < nk; ++h)
    for (int64_t i = 0; i < dk; ++i) q_rows.push_back(h * per_key_head + i), k_rows.push_back(h * per_key_head + dk + i);
  for (int64_t j = 0; j < nv; ++j) {  // value head j belongs to key head j / r, as the (j % r)-th of its group
    const int64_t base = (j / r) * per_key_head + 2 * dk + (j % r) * dv;
    for (int64_t i = 0; i < dv; ++i) v_rows.push_back(base + i), z_rows.push_back(base + r * dv + i);
    b_rows.push_back((j / r) * 2 * r + j % r), a_rows.push_back((j / r) * 2 * r + r + j % r);
  }
  at::Tensor mixed = at::cat({rows(qkvz, q_rows), rows(qkvz, k_rows), rows(qkvz, v_rows)}, -1);  // [B, S, C]
  const at::Tensor w = p["conv1d"];                                                                 // [C, 1, K]
  const int64_t taps = w.size(2);
  at::Tensor conv = at::zeros_like(mixed);
  for (int64_t t = 0; t < seq; ++t)
    for (int64_t j = 0; j < taps; ++j) {
      const int64_t source = t - (taps - 1) + j;  // tap K - 1 is the token itself
      if (source >= 0) conv.select(1, t).add_(mixed.select(1, source) * w.select(2, j).squeeze(1));
    }
  conv = conv * at::sigmoid(conv);
  auto l2 = [](const at::Tensor& y) { return y / at::sqrt((y * y).sum(-1, true) + 1e-6); };
  at::Tensor q = l2(conv.narrow(-1, 0, nk * dk).view({batch, seq, nk, dk})) / std::sqrt(double(dk));
  at::Tensor k = l2(conv.narrow(-1, nk * dk, nk * dk).view({batch, seq, nk, dk}));
  at::Tensor v = conv.narrow(-1, 2 * nk * dk, nv * dv).view({batch, seq, nv, dv});
  std::vector<int64_t> key_head_of;
  for (int64_t j = 0; j < nv; ++j) key_head_of.push_back(j / r);
  at::Tensor of = at::tensor(key_head_of, at::kLong);
  at::Tensor a = rows(ba, a_rows), b = rows(ba, b_rows);  // [B, S, nv]
  at::Tensor g = -p["A_log"].exp() * at::log1p(at::exp(a + p["dt_bias"]));
  at::Tensor out = naive_rule(q.index_select(2, of), k.index_select(2, of), v, g, 1 / (1 + at::exp(-b)));  // [B, S, nv, dv]
  at::Tensor z = rows(qkvz, z_rows).view({batch, seq, nv, dv});
  at::Tensor normed = out / at::sqrt(out.pow(2).mean(-1, true) + 1e-6) * p["norm"] * (z * at::sigmoid(z));
  return at::matmul(normed.reshape({batch, seq, nv * dv}), p["out_proj"].t());
}

void compare_layer(int64_t nk, int64_t nv, int64_t dk, int64_t dv, int64_t kernel, int64_t chunk) {
  at::manual_seed(nk * 100 + nv * 10 + chunk);
  const int64_t hidden = 8, batch = 2, seq = 9;
  Layer layer = make_layer("num_key_heads = " + std::to_string(nk) + "\nnum_value_heads = " + std::to_string(nv) +
                               "\nkey_head_dim = " + std::to_string(dk) + "\nvalue_head_dim = " + std::to_string(dv) +
                               "\nconv_kernel = " + std::to_string(kernel) + "\nchunk_size = " + std::to_string(chunk) + "\n",
                           hidden);
  {
    at::NoGradGuard no_grad;  // defaults of 1 would hide a missing or misplaced weight
    layer.p["dt_bias"].normal_(0.0, 1.0), layer.p["norm"].normal_(1.0, 0.5);
    layer.p["A_log"].uniform_(-1.0, 1.0);
  }
  at::Tensor x = at::randn({batch, seq, hidden}, at::kDouble).requires_grad_(true);
  at::Tensor out = layer.attention->forward(x, at::arange(seq, at::kLong));
  at::Tensor expected = naive_layer(x, layer.p, nk, nv, dk, dv);
  ASSERT_EQ(out.sizes(), x.sizes());
  double worst = relative_error(out, expected);
  EXPECT_LT(worst, 1e-10) << "forward";
  std::vector<at::Tensor> inputs = {x};
  std::vector<std::string> names = {"input"};
  for (auto& parameter : layer.attention->parameters()) inputs.push_back(parameter.tensor), names.push_back(parameter.name);
  at::Tensor probe = at::randn(out.sizes(), at::kDouble);
  std::vector<at::Tensor> grads = gradients(out, probe, inputs), expected_grads = gradients(expected, probe, inputs);
  for (size_t i = 0; i < inputs.size(); ++i) {
    ASSERT_GT(expected_grads[i].abs().max().item<double>(), 0) << names[i] << " has no effect on the reference";
    const double error = relative_error(grads[i], expected_grads[i]);
    EXPECT_LT(error, 1e-10) << "gradient of " << names[i];
    worst = std::max(worst, error);
  }
  std::printf("heads %lld/%lld, dims %lld/%lld, kernel %lld, chunk %lld: max relative error %.3g\n", (long long)nk,
              (long long)nv, (long long)dk, (long long)dv, (long long)kernel, (long long)chunk, worst);
}

}  // namespace

TEST(GatedDeltaNet, LayerMatchesNaive) { compare_layer(2, 2, 3, 2, 4, 4); }
TEST(GatedDeltaNet, GroupedValueHeadsMatchNaive) { compare_layer(2, 4, 3, 2, 3, 4); }
TEST(GatedDeltaNet, OneChunkAndOneTokenChunksMatchNaive) {
  compare_layer(1, 3, 4, 3, 2, 64);
  compare_layer(1, 3, 4, 3, 2, 1);
}

TEST(GatedDeltaNet, ParametersHaveQwen3NextNamesAndShapes) {
  // hidden 8, 2 key heads of 3, 4 value heads of 2, kernel 4: Qwen3NextGatedDeltaNet's tensors, conv1d with its [C, 1, K].
  Layer layer = make_layer("num_key_heads = 2\nnum_value_heads = 4\nkey_head_dim = 3\nvalue_head_dim = 2\n", 8);
  const std::vector<std::pair<std::string, std::vector<int64_t>>> expected = {
      {"in_proj_qkvz", {2 * 3 * 2 + 2 * 4 * 2, 8}}, {"in_proj_ba", {8, 8}}, {"conv1d", {2 * 2 * 3 + 4 * 2, 1, 4}},
      {"dt_bias", {4}}, {"A_log", {4}}, {"norm", {2}}, {"out_proj", {8, 8}}};
  auto parameters = layer.attention->parameters();
  ASSERT_EQ(parameters.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(parameters[i].name, expected[i].first);
    EXPECT_EQ(parameters[i].tensor.sizes().vec(), expected[i].second) << expected[i].first;
    EXPECT_EQ(parameters[i].weight_decay, parameters[i].tensor.dim() >= 2) << expected[i].first << ": decay on matrices only";
  }
  const at::Tensor a = at::exp(layer.p["A_log"]);
  EXPECT_TRUE(a.min().item<double>() >= 0.01 - 1e-12 && a.max().item<double>() <= 16 + 1e-12) << "A starts in [0.01, 16]";
  EXPECT_FALSE(layer.attention->supports_context_parallel()) << "the recurrence cannot split a sequence over ranks";
}

TEST(GatedDeltaNet, BadOptionsNameTheKey) {
  auto error_of = [](const std::string& toml) {
    try {
      make_layer(toml, 8);
    } catch (const Error& error) {
      return std::string(error.what());
    }
    return std::string("(no error)");
  };
  std::string message = error_of("num_key_heads = 2\nnum_value_heads = 3\n");
  EXPECT_NE(message.find("test.toml:2: num_value_heads = 3 is out of range: it must be a multiple of num_key_heads (2)"),
            std::string::npos) << message;
  message = error_of("chunk_size = 0\n");
  EXPECT_NE(message.find("test.toml:1: chunk_size = 0 is out of range: it must be >= 1"), std::string::npos) << message;
  message = error_of("conv_kernel = 2\nchunk_sise = 8\n");
  EXPECT_NE(message.find("did you mean 'chunk_size'"), std::string::npos) << message;
}

// Reference from tests/parity/gated_deltanet_reference.py: transformers' module in float32 on random weights.
// File format: per tensor a line "name ndim d0 d1 ..." and a line of its values (float32, written with 9 digits).
TEST(GatedDeltaNet, MatchesTransformersQwen3NextGatedDeltaNet) {
  const char* path = std::getenv("PITHTRAIN_GATED_DELTANET_REFERENCE");
  if (path == nullptr) GTEST_SKIP() << "run by ctest parity_gated_deltanet (tests/test_parity_gated_deltanet.sh)";
  std::ifstream in(path);
  ASSERT_TRUE(in) << path;
  std::map<std::string, at::Tensor> ref;
  std::map<std::string, int64_t> config;
  std::string name;
  while (in >> name) {
    if (name == "config") {  // "config key value"
      std::string key;
      int64_t value;
      in >> key >> value;
      config[key] = value;
      continue;
    }
    int64_t dims;
    in >> dims;
    std::vector<int64_t> shape(dims);
    int64_t count = 1;
    for (auto& size : shape) in >> size, count *= size;
    std::vector<float> values(count);
    for (auto& value : values) in >> value;
    ref[name] = at::tensor(values, at::kFloat).view(shape).clone();
  }
  ASSERT_TRUE(ref.count("input") && ref.count("output")) << path;
  PluginContext context;
  context.dims = {.hidden_size = config["hidden_size"], .num_layers = 2, .num_heads = 2, .num_kv_heads = 2, .head_dim = 4};
  Options options = Options::from_string(
      "num_key_heads = " + std::to_string(config["num_key_heads"]) + "\nnum_value_heads = " + std::to_string(config["num_value_heads"]) +
          "\nkey_head_dim = " + std::to_string(config["key_head_dim"]) + "\nvalue_head_dim = " + std::to_string(config["value_head_dim"]) +
          "\nconv_kernel = " + std::to_string(config["conv_kernel"]) + "\nchunk_size = " + std::to_string(config["chunk_size"]) + "\n",
      "reference");
  auto attention = pithtrain_plugin()->make_attention(options, context);
  auto parameters = attention->parameters();
  {
    at::NoGradGuard no_grad;
    for (auto& parameter : parameters) {  // transformers' names: X.weight for modules, the bare name for parameters
      const std::string theirs = ref.count(parameter.name) ? parameter.name : parameter.name + ".weight";
      ASSERT_TRUE(ref.count(theirs)) << "no reference tensor for " << parameter.name;
      ASSERT_EQ(ref[theirs].sizes(), parameter.tensor.sizes()) << parameter.name;
      parameter.tensor.copy_(ref[theirs]);
    }
  }
  at::Tensor x = ref["input"].clone().requires_grad_(true);
  at::Tensor out = attention->forward(x, at::arange(x.size(1), at::kLong));
  const double scale = ref["output"].abs().max().item<double>();
  const double error = (out.detach() - ref["output"]).abs().max().item<double>();
  EXPECT_LT(error, 1e-5 * scale) << "max |output difference| " << error << " at scale " << scale;
  (out * ref["probe"]).sum().backward();
  double worst = 0;
  int compared = 0;
  for (auto& [grad_name, expected] : ref) {
    if (grad_name.rfind("grad/", 0) != 0) continue;
    const std::string target = grad_name.substr(5);
    at::Tensor actual;
    if (target == "input") actual = x.grad();
    for (auto& parameter : parameters)
      if (parameter.name == target || parameter.name + ".weight" == target) actual = parameter.tensor.grad();
    ASSERT_TRUE(actual.defined()) << grad_name;
    const double grad_scale = std::max(expected.abs().max().item<double>(), 1e-12);
    const double grad_error = (actual - expected).abs().max().item<double>() / grad_scale;
    EXPECT_LT(grad_error, 1e-4) << grad_name;
    worst = std::max(worst, grad_error);
    ++compared;
  }
  EXPECT_EQ(compared, static_cast<int>(parameters.size()) + 1) << "the input's and every parameter's gradient";
  std::printf("transformers: output max difference %.3g at scale %.3g; gradients max relative difference %.3g (%d compared)\n",
              error, scale, worst, compared);
}
