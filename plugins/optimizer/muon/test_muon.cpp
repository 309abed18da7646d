// muon against torch.optim.Muon (run by the venv's python), against the rule written out in double
// precision, and its AdamW part against the adamw plugin; roles, bad options, fully_sharded's flat shards.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>

#include <ATen/ATen.h>
#include <stdlib.h>
#include <unistd.h>

#include "pithtrain/optimizer.h"
#include "registry.h"

using namespace pithtrain;
namespace fs = std::filesystem;

namespace {

std::unique_ptr<Optimizer> make(const std::vector<Parameter>& parameters, const std::string& toml) {
  PluginContext context;
  context.parameters = parameters;
  Options options = Options::from_string(toml, "test.toml");
  auto optimizer = pithtrain_plugin()->make_optimizer(options, context);
  options.check_unknown_keys("optimizer plugin 'muon'");
  return optimizer;
}

// The name of each state tensor, in order.
std::vector<std::string> state_names(Optimizer& optimizer) {
  std::vector<std::string> names;
  for (const auto& item : optimizer.state()) names.push_back(item.name);
  return names;
}

// The message of the Error that building with `toml` throws ("" when none is thrown).
std::string error_of(const std::vector<Parameter>& parameters, const std::string& toml) {
  try {
    make(parameters, toml);
  } catch (const Error& error) {
    return error.what();
  }
  return "";
}

// Runs `script` with the venv's python; returns its output, failing the test when it exits non-zero.
std::string run_python(const fs::path& script, const std::string& arguments) {
  const std::string command = std::string(PITHTRAIN_PYTHON) + " " + script.string() + " " + arguments + " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return "popen failed";
  std::string output;
  char buffer[512];
  while (std::fgets(buffer, sizeof(buffer), pipe)) output += buffer;
  EXPECT_EQ(::pclose(pipe), 0) << command << "\n" << output;
  return output;
}

at::Tensor read_floats(const fs::path& path, int64_t count) {
  std::ifstream in(path, std::ios::binary);
  at::Tensor values = at::empty({count}, at::kFloat);
  in.read(reinterpret_cast<char*>(values.data_ptr<float>()), count * static_cast<std::streamsize>(sizeof(float)));
  EXPECT_TRUE(in.good()) << path << " holds fewer than " << count << " floats";
  return values;
}

// torch.optim.Muon over float32 matrices (an [E, out, in] case as E separate 2-D parameters, as Muon
// takes only matrices) with random gradients; writes, per case, the start weights, the 5 gradients
// and the weights after each step as raw float32.
constexpr const char* kTorchMuon = R"(import sys
import torch
folder, momentum, nesterov, adjust, weight_decay, lr = sys.argv[1:7]
torch.manual_seed(0)
for name, shape in [("wide", (8, 16)), ("tall", (16, 8)), ("square", (12, 12)), ("experts", (3, 10, 6))]:
    stacked = len(shape) == 3
    w0 = torch.randn(shape)
    grads = [torch.randn(shape) for _ in range(5)]
    matrices = [w.clone().requires_grad_() for w in (w0.unbind(0) if stacked else [w0])]
    # eps and ns_steps stay torch's defaults: the plugin's defaults must equal them.
    muon = torch.optim.Muon(matrices, lr=float(lr), weight_decay=float(weight_decay), momentum=float(momentum),
                            nesterov=nesterov == "true", adjust_lr_fn=adjust)
    out = [w0, *grads]
    for grad in grads:
        for p, g in zip(matrices, grad.unbind(0) if stacked else [grad]):
            p.grad = g.clone()
        muon.step()
        out.append(torch.stack([p.detach() for p in matrices]) if stacked else matrices[0].detach().clone())
    torch.cat([t.reshape(-1) for t in out]).numpy().tofile(f"{folder}/{name}.f32")
)";

void compare_with_torch(double momentum, bool nesterov, const std::string& adjust, double weight_decay, double lr) {
  // A fresh folder by mkdtemp, emptied by name at the end: std::filesystem::remove_all resolves to
  // libtorch.so's copy here, which crashes.
  std::string folder = (fs::temp_directory_path() / "pithtrain_test_muon_XXXXXX").string();
  ASSERT_NE(::mkdtemp(folder.data()), nullptr);
  const fs::path dir = folder;
  std::ofstream(dir / "muon.py") << kTorchMuon;
  run_python(dir / "muon.py", dir.string() + " " + std::to_string(momentum) + " " + (nesterov ? "true" : "false") + " " + adjust +
                                  " " + std::to_string(weight_decay) + " " + std::to_string(lr));

  // The cases under the names a model gives them, so the default roles send all of them to Muon.
  const std::vector<std::pair<std::string, std::vector<int64_t>>> cases = {
      {"wide", {8, 16}}, {"tall", {16, 8}}, {"square", {12, 12}}, {"experts", {3, 10, 6}}};
  const std::vector<std::string> names = {"layers.0.attention.q_proj", "layers.0.attention.o_proj", "layers.0.mlp.up_proj",
                                          "layers.1.experts.gate_proj"};
  std::vector<Parameter> parameters;
  std::vector<at::Tensor> recorded;  // per case [11, numel]: w0, 5 gradients, 5 weights
  for (size_t c = 0; c < cases.size(); ++c) {
    const int64_t numel = c10::multiply_integers(cases[c].second);
    recorded.push_back(read_floats(dir / (cases[c].first + ".f32"), 11 * numel).view({11, numel}));
    parameters.push_back({names[c], recorded[c][0].view(cases[c].second).clone(), true});
  }
  auto muon = make(parameters, "momentum = " + std::to_string(momentum) + "\nnesterov = " + (nesterov ? "true" : "false") +
                                   "\nadjust_lr = \"" + adjust + "\"\nweight_decay = " + std::to_string(weight_decay) + "\n");
  for (int step = 0; step < 5; ++step) {
    for (size_t c = 0; c < cases.size(); ++c)
      parameters[c].tensor.mutable_grad() = recorded[c][1 + step].view(cases[c].second).clone();
    muon->step(lr);
    for (size_t c = 0; c < cases.size(); ++c) {
      at::Tensor expected = recorded[c][6 + step].view(cases[c].second);
      EXPECT_TRUE(at::allclose(parameters[c].tensor, expected, 1e-5, 1e-5))
          << cases[c].first << " step " << step + 1 << ": max difference " << (parameters[c].tensor - expected).abs().max().item<double>();
    }
  }
  // Both moved well beyond the tolerance, so the agreement is not that of two optimizers doing nothing.
  for (size_t c = 0; c < cases.size(); ++c)
    EXPECT_GT((parameters[c].tensor - recorded[c][0].view(cases[c].second)).abs().max().item<double>(), 1e-3) << cases[c].first;
  for (const auto& [name, shape] : cases) std::remove((dir / (name + ".f32")).c_str());
  std::remove((dir / "muon.py").c_str());
  ::rmdir(dir.c_str());
}

}  // namespace

TEST(Muon, EqualsTorchMuonWithMoonlightScale) { compare_with_torch(0.95, true, "match_rms_adamw", 0.1, 0.02); }

TEST(Muon, EqualsTorchMuonWithOriginalScaleWithoutNesterov) { compare_with_torch(0.8, false, "original", 0.05, 0.05); }

// The rule of muon.cpp's opening comment with plain loops in double (ns_dtype = "float64").
TEST(Muon, FollowsTheRuleInDoublePrecision) {
  using Matrix = std::vector<std::vector<double>>;
  auto multiply = [](const Matrix& x, const Matrix& y) {
    Matrix z(x.size(), std::vector<double>(y[0].size(), 0.0));
    for (size_t i = 0; i < x.size(); ++i)
      for (size_t k = 0; k < y.size(); ++k)
        for (size_t j = 0; j < y[0].size(); ++j) z[i][j] += x[i][k] * y[k][j];
    return z;
  };
  auto transpose = [](const Matrix& x) {
    Matrix t(x[0].size(), std::vector<double>(x.size()));
    for (size_t i = 0; i < x.size(); ++i)
      for (size_t j = 0; j < x[0].size(); ++j) t[j][i] = x[i][j];
    return t;
  };
  auto newton_schulz = [&](Matrix x) {
    double norm = 0;
    for (auto& row : x)
      for (double v : row) norm += v * v;
    norm = std::max(std::sqrt(norm), 1e-7);
    for (auto& row : x)
      for (double& v : row) v /= norm;
    for (int step = 0; step < 5; ++step) {
      Matrix a = multiply(x, transpose(x)), aa = multiply(a, a);
      for (size_t i = 0; i < a.size(); ++i)
        for (size_t j = 0; j < a.size(); ++j) a[i][j] = -4.7750 * a[i][j] + 2.0315 * aa[i][j];
      Matrix ax = multiply(a, x);
      for (size_t i = 0; i < x.size(); ++i)
        for (size_t j = 0; j < x[0].size(); ++j) x[i][j] = 3.4445 * x[i][j] + ax[i][j];
    }
    return x;
  };
  auto matrix_of = [](const at::Tensor& t) {
    Matrix m(t.size(0), std::vector<double>(t.size(1)));
    for (int64_t i = 0; i < t.size(0); ++i)
      for (int64_t j = 0; j < t.size(1); ++j) m[i][j] = t[i][j].item<double>();
    return m;
  };

  at::manual_seed(3);
  const double lr = 0.03, mu = 0.9, wd = 0.2;
  std::vector<Parameter> parameters = {{"layers.0.attention.q_proj", at::randn({5, 7}, at::kDouble), true},
                                       {"layers.0.attention.o_proj", at::randn({7, 5}, at::kDouble), true},
                                       {"layers.1.experts.down_proj", at::randn({2, 4, 6}, at::kDouble), true}};
  // The reference: one plain matrix per parameter, or per expert.
  std::vector<Matrix> weights, momenta;
  for (const auto& parameter : parameters) {
    at::Tensor stack = parameter.tensor.dim() == 2 ? parameter.tensor.unsqueeze(0) : parameter.tensor;
    for (int64_t e = 0; e < stack.size(0); ++e) {
      weights.push_back(matrix_of(stack[e]));
      momenta.push_back(Matrix(stack.size(1), std::vector<double>(stack.size(2), 0.0)));
    }
  }
  auto muon = make(parameters, "momentum = 0.9\nweight_decay = 0.2\nns_dtype = \"float64\"\n");
  for (int step = 0; step < 3; ++step) {
    size_t slot = 0;
    for (auto& parameter : parameters) {
      parameter.tensor.mutable_grad() = at::randn(parameter.tensor.sizes(), at::kDouble);
      at::Tensor grads = parameter.tensor.dim() == 2 ? parameter.tensor.grad().unsqueeze(0) : parameter.tensor.grad();
      for (int64_t e = 0; e < grads.size(0); ++e, ++slot) {
        Matrix g = matrix_of(grads[e]), u = g;
        Matrix& m = momenta[slot];
        for (size_t i = 0; i < g.size(); ++i)
          for (size_t j = 0; j < g[0].size(); ++j) {
            m[i][j] = mu * m[i][j] + (1 - mu) * g[i][j];
            u[i][j] = (1 - mu) * g[i][j] + mu * m[i][j];
          }
        const bool tall = g.size() > g[0].size();
        Matrix o = tall ? transpose(newton_schulz(transpose(u))) : newton_schulz(u);
        const double scale = 0.2 * std::sqrt(static_cast<double>(std::max(g.size(), g[0].size())));
        for (size_t i = 0; i < g.size(); ++i)
          for (size_t j = 0; j < g[0].size(); ++j) weights[slot][i][j] = weights[slot][i][j] * (1 - lr * wd) - lr * scale * o[i][j];
      }
    }
    muon->step(lr);
    slot = 0;
    for (const auto& parameter : parameters) {
      at::Tensor stack = parameter.tensor.dim() == 2 ? parameter.tensor.unsqueeze(0) : parameter.tensor;
      for (int64_t e = 0; e < stack.size(0); ++e, ++slot)
        for (int64_t i = 0; i < stack.size(1); ++i)
          for (int64_t j = 0; j < stack.size(2); ++j)
            ASSERT_NEAR(stack[e][i][j].item<double>(), weights[slot][i][j], 1e-12) << parameter.name << " step " << step + 1;
    }
  }
}

// Everything but the matrices goes through AdamW exactly as the adamw plugin updates it.
TEST(Muon, AdamWPartEqualsTheAdamWPlugin) {
  at::manual_seed(1);
  auto model_parameters = [] {
    return std::vector<Parameter>{{"embedding.weight", at::randn({10, 4}, at::kDouble), true},
                                  {"layers.0.attention_norm.weight", at::randn({4}, at::kDouble), false},
                                  {"layers.0.router.gate.weight", at::randn({3, 4}, at::kDouble), true},
                                  {"layers.0.experts.gate_bias", at::randn({3, 5}, at::kDouble), false},
                                  {"lm_head.weight", at::randn({10, 4}, at::kDouble), true}};
  };
  std::vector<Parameter> ours = model_parameters();
  std::vector<Parameter> theirs;
  for (const auto& parameter : ours) theirs.push_back({parameter.name, parameter.tensor.clone(), parameter.weight_decay});
  ours.push_back({"layers.0.attention.q_proj", at::randn({6, 4}, at::kDouble), true});  // Muon's, beside them
  const at::Tensor q_before = ours.back().tensor.clone();

  auto muon = make(ours, "adamw_beta1 = 0.8\nadamw_beta2 = 0.9\nadamw_eps = 1e-6\nweight_decay = 0.2\n");
  LoadedPlugin adamw_plugin = load_plugin_file(fs::path(PITHTRAIN_PLUGIN_DIR) / "optimizer_adamw.so");
  PluginContext context;
  context.parameters = theirs;
  Options options = Options::from_string("beta1 = 0.8\nbeta2 = 0.9\neps = 1e-6\nweight_decay = 0.2\n", "adamw.toml");
  auto adamw = adamw_plugin.descriptor->make_optimizer(options, context);

  for (int step = 0; step < 10; ++step) {
    for (size_t i = 0; i < ours.size(); ++i) {
      ours[i].tensor.mutable_grad() = at::randn(ours[i].tensor.sizes(), at::kDouble);
      if (i < theirs.size()) theirs[i].tensor.mutable_grad() = ours[i].tensor.grad().clone();
    }
    muon->step(0.01);
    adamw->step(0.01);
    for (size_t i = 0; i < theirs.size(); ++i)
      ASSERT_TRUE(at::allclose(ours[i].tensor, theirs[i].tensor, 1e-12, 1e-12))
          << ours[i].name << " step " << step + 1 << ": " << (ours[i].tensor - theirs[i].tensor).abs().max().item<double>();
  }
  EXPECT_GT((ours.back().tensor - q_before).abs().max().item<double>(), 0.01);
  // The AdamW part's state is named as the adamw plugin names it; the matrix has one momentum.
  std::vector<std::string> expected = state_names(*adamw);
  expected.push_back("layers.0.attention.q_proj.momentum");
  EXPECT_EQ(state_names(*muon), expected);
}

// Expert parallel: each rank holds a block of experts and orthogonalises only those; every expert's
// update is its own, so two halves stepped apart equal the whole.
TEST(Muon, EachExpertIsOrthogonalisedOnItsOwn) {
  at::manual_seed(2);
  at::Tensor whole = at::randn({4, 6, 5});
  std::vector<Parameter> one = {{"layers.1.experts.up_proj", whole.clone(), true, true}};
  std::vector<Parameter> first = {{"layers.1.experts.up_proj", whole.narrow(0, 0, 2).clone(), true, true}};
  std::vector<Parameter> second = {{"layers.1.experts.up_proj", whole.narrow(0, 2, 2).clone(), true, true}};
  auto all = make(one, ""), rank0 = make(first, ""), rank1 = make(second, "");
  for (int step = 0; step < 3; ++step) {
    at::Tensor grad = at::randn({4, 6, 5});
    one[0].tensor.mutable_grad() = grad.clone();
    first[0].tensor.mutable_grad() = grad.narrow(0, 0, 2).clone();
    second[0].tensor.mutable_grad() = grad.narrow(0, 2, 2).clone();
    all->step(0.02), rank0->step(0.02), rank1->step(0.02);
  }
  EXPECT_FALSE(at::allclose(one[0].tensor, whole, 1e-3, 1e-3));
  EXPECT_TRUE(at::equal(one[0].tensor, at::cat({first[0].tensor, second[0].tensor})));
}

TEST(Muon, RolesTakeTheirDocumentedRuleAndCanBeSwitched) {
  auto parameters = [] {
    return std::vector<Parameter>{{"embedding.weight", at::zeros({10, 4}), true},
                                  {"layers.0.attention_norm.weight", at::ones({4}), false},
                                  {"layers.0.attention.q_proj", at::zeros({4, 4}), true},
                                  {"layers.0.attention.sinks", at::zeros({2}), false},
                                  {"layers.0.router.gate.weight", at::zeros({3, 4}), true},
                                  {"layers.0.experts.gate_proj", at::zeros({3, 5, 4}), true},
                                  {"layers.0.experts.gate_bias", at::zeros({3, 5}), false},
                                  {"layers.0.shared_experts.up_proj", at::zeros({5, 4}), true},
                                  {"layers.0.odd_vector", at::zeros({4}), true},  // decayed, but no matrix
                                  {"lm_head.weight", at::zeros({10, 4}), true}};
  };
  auto rules = [](Optimizer& optimizer) {  // parameter name -> "muon" / "adamw", from the state names
    std::map<std::string, std::string> result;
    for (const auto& name : state_names(optimizer)) {
      if (name.size() > 9 && name.substr(name.size() - 9) == ".momentum") result[name.substr(0, name.size() - 9)] = "muon";
      if (name.size() > 8 && name.substr(name.size() - 8) == ".exp_avg") result[name.substr(0, name.size() - 8)] = "adamw";
    }
    return result;
  };
  std::map<std::string, std::string> defaults = {
      {"embedding.weight", "adamw"},           {"layers.0.attention_norm.weight", "adamw"}, {"layers.0.attention.q_proj", "muon"},
      {"layers.0.attention.sinks", "adamw"},   {"layers.0.router.gate.weight", "adamw"},    {"layers.0.experts.gate_proj", "muon"},
      {"layers.0.experts.gate_bias", "adamw"}, {"layers.0.shared_experts.up_proj", "muon"}, {"layers.0.odd_vector", "adamw"},
      {"lm_head.weight", "adamw"}};
  EXPECT_EQ(rules(*make(parameters(), "")), defaults);

  std::map<std::string, std::string> switched = defaults;
  for (const char* name : {"embedding.weight", "layers.0.router.gate.weight", "lm_head.weight"}) switched[name] = "muon";
  for (const char* name : {"layers.0.attention.q_proj", "layers.0.experts.gate_proj", "layers.0.shared_experts.up_proj"})
    switched[name] = "adamw";
  EXPECT_EQ(rules(*make(parameters(), "embedding = \"muon\"\nlm_head = \"muon\"\nrouter_gate = \"muon\"\n"
                                      "matrices = \"adamw\"\nexpert_matrices = \"adamw\"\n")),
            switched);
}

TEST(Muon, RefusesBadValuesByKey) {
  const std::vector<Parameter> parameters = {{"layers.0.attention.q_proj", at::zeros({4, 4}), true}};
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"momentum = 1\n", "momentum = 1 is out of range: it must be in [0, 1)"},
      {"ns_steps = 0\n", "ns_steps = 0 is out of range: it must be >= 1"},
      {"eps = 0\n", "eps = 0 is out of range: it must be > 0"},
      {"weight_decay = -0.1\n", "weight_decay = -0.1 is out of range: it must be >= 0"},
      {"adamw_beta2 = 1\n", "adamw_beta2 = 1 is out of range: it must be in [0, 1)"},
      {"adamw_eps = nan\n", "adamw_eps = nan is not a finite number"},
      {"adjust_lr = \"moonlight\"\n", "adjust_lr = \"moonlight\" is out of range: it must be \"match_rms_adamw\""},
      {"ns_dtype = \"float16\"\n", "ns_dtype = \"float16\" is out of range: it must be \"bfloat16\", \"float32\" or \"float64\""},
      {"embedding = \"sgd\"\n", "embedding = \"sgd\" is out of range: it must be \"muon\" or \"adamw\""},
      {"expert_matrices = \"Muon\"\n", "expert_matrices = \"Muon\" is out of range: it must be \"muon\" or \"adamw\""},
      {"nesterov = 1\n", "nesterov"},
      {"beta1 = 0.9\n", "unknown key 'beta1'"},
  };
  for (const auto& [toml, expected] : cases) {
    const std::string message = error_of(parameters, toml);
    EXPECT_NE(message.find(expected), std::string::npos) << toml << "gave: " << message;
    EXPECT_NE(message.find("test.toml:1"), std::string::npos) << toml << "gave: " << message;
  }
}

// schedule fully_sharded gives the optimizer a flat 1-D shard of every parameter.
TEST(Muon, RefusesFullyShardedFlatShardsByName) {
  const std::vector<Parameter> shards = {{"embedding.weight", at::zeros({20}), true},
                                         {"layers.0.attention_norm.weight", at::zeros({2}), false},
                                         {"layers.0.attention.q_proj", at::zeros({8}), true},
                                         {"lm_head.weight", at::zeros({20}), true}};
  const std::string message = error_of(shards, "");
  for (const char* part : {"'layers.0.attention.q_proj'", "optimizer.matrices = \"muon\"", "schedule.plugin = \"fully_sharded\"",
                           "schedule.plugin = \"single\"", "optimizer.plugin = \"adamw\""})
    EXPECT_NE(message.find(part), std::string::npos) << part << " not in: " << message;
  // With every matrix role on AdamW nothing needs a matrix, so the shards are accepted.
  EXPECT_EQ(error_of(shards, "matrices = \"adamw\"\nexpert_matrices = \"adamw\"\n"), "");
}
