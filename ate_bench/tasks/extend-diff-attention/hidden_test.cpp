// Hidden numeric test of extend-diff-attention: the plugin equals an element-by-element reference of
// differential attention (two causal softmax maps of RoPE'd query/key halves, lambda, head RMSNorm).
#include <cmath>

#include "hidden_common.h"
#include "pithtrain/attention.h"

namespace {

// Rotates x [S, w] (one head's half) by position * theta^(-2i/w), pairs (i, i + w/2).
std::vector<std::vector<double>> rope(const std::vector<std::vector<double>>& x, double theta) {
  auto out = x;
  const int64_t w = x[0].size();
  for (size_t s = 0; s < x.size(); ++s)
    for (int64_t i = 0; i < w / 2; ++i) {
      double angle = s * std::pow(theta, -2.0 * i / w), a = x[s][i], b = x[s][i + w / 2];
      out[s][i] = a * std::cos(angle) - b * std::sin(angle);
      out[s][i + w / 2] = b * std::cos(angle) + a * std::sin(angle);
    }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const auto* descriptor = hidden::load(argv[1]);
  at::manual_seed(5);
  const int64_t batch = 2, seq = 7, hidden_size = 12, heads = 4, kv_heads = 2, d = 8, layer = 3;
  pithtrain::PluginContext context;
  context.dims = {.hidden_size = hidden_size, .num_layers = 4, .num_heads = heads, .num_kv_heads = kv_heads, .head_dim = d,
                  .rope_theta = 100.0, .init_std = 0.4};
  context.dtype = at::kDouble;
  context.layer_index = layer;
  pithtrain::Options options = pithtrain::Options::from_string("", "hidden.toml");
  auto attention = descriptor->make_attention(options, context);
  auto parameters = attention->parameters();
  at::Tensor wq = hidden::parameter(parameters, "q_proj").detach(), wk = hidden::parameter(parameters, "k_proj").detach();
  at::Tensor wv = hidden::parameter(parameters, "v_proj").detach(), wo = hidden::parameter(parameters, "o_proj").detach();
  std::vector<at::Tensor> lambdas;
  for (const char* name : {"lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"}) {
    at::Tensor lambda = hidden::parameter(parameters, name);
    at::NoGradGuard no_grad;
    lambda.copy_(at::randn({d / 2}, at::kDouble) * 0.4);
    lambdas.push_back(lambda.detach());
  }
  hidden::expect(wq.sizes() == at::IntArrayRef({heads * d, hidden_size}) && wk.sizes() == at::IntArrayRef({kv_heads * d, hidden_size}) &&
                     wo.sizes() == at::IntArrayRef({hidden_size, heads * d}),
                 "projection shapes q [h D, H], k and v [kv D, H], o [H, h D]");
  at::Tensor x = at::randn({batch, seq, hidden_size}, at::kDouble);
  at::Tensor out = attention->forward(x, at::arange(seq, at::kLong)).detach();

  const double lambda_init = 0.8 - 0.6 * std::exp(-0.3 * layer);
  const double lambda = std::exp(at::dot(lambdas[0], lambdas[1]).item<double>()) -
                        std::exp(at::dot(lambdas[2], lambdas[3]).item<double>()) + lambda_init;
  at::Tensor q = at::matmul(x, wq.t()), k = at::matmul(x, wk.t()), v = at::matmul(x, wv.t());
  at::Tensor expected = at::zeros({batch, seq, hidden_size}, at::kDouble);
  for (int64_t b = 0; b < batch; ++b) {
    at::Tensor concat = at::zeros({seq, heads * d}, at::kDouble);
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t g = h / (heads / kv_heads);
      auto slice = [&](const at::Tensor& t, int64_t head, int64_t start) {
        std::vector<std::vector<double>> rows(seq, std::vector<double>(d / 2));
        for (int64_t s = 0; s < seq; ++s)
          for (int64_t i = 0; i < d / 2; ++i) rows[s][i] = t[b][s][head * d + start + i].item<double>();
        return rope(rows, 100.0);
      };
      auto q1 = slice(q, h, 0), q2 = slice(q, h, d / 2), k1 = slice(k, g, 0), k2 = slice(k, g, d / 2);
      for (int64_t s = 0; s < seq; ++s) {
        std::vector<double> map(s + 1, 0.0);
        for (auto [qa, ka, sign] : {std::tuple{&q1, &k1, 1.0}, {&q2, &k2, -lambda}}) {
          std::vector<double> scores(s + 1);
          double max_score = -1e300, total = 0;
          for (int64_t t = 0; t <= s; ++t) {
            for (int64_t i = 0; i < d / 2; ++i) scores[t] += (*qa)[s][i] * (*ka)[t][i];
            scores[t] /= std::sqrt(d / 2.0);
            max_score = std::max(max_score, scores[t]);
          }
          for (auto& score : scores) total += score = std::exp(score - max_score);
          for (int64_t t = 0; t <= s; ++t) map[t] += sign * scores[t] / total;
        }
        std::vector<double> head_out(d, 0.0);
        double mean_square = 0;
        for (int64_t i = 0; i < d; ++i) {
          for (int64_t t = 0; t <= s; ++t) head_out[i] += map[t] * v[b][t][g * d + i].item<double>();
          mean_square += head_out[i] * head_out[i] / d;
        }
        for (int64_t i = 0; i < d; ++i) concat[s][h * d + i] = head_out[i] / std::sqrt(mean_square + 1e-5) * (1 - lambda_init);
      }
    }
    expected[b] = at::matmul(concat, wo.t());
  }
  const double error = (out - expected).abs().max().item<double>();
  char detail[96];
  std::snprintf(detail, sizeof(detail), "output equals the reference (max difference %.2e, lambda %.3f)", error, lambda);
  hidden::expect(error < 1e-9, detail);
  return hidden::finish();
}
