// Parity with transformers: a model imported with `pithtrain convert import` computes the same logits,
// loss and gradients as transformers on the same tokens. The reference comes from
// tests/parity/make_reference.py (run by tests/test_parity.sh, which passes the folder in argv).
#include <gtest/gtest.h>

#include <filesystem>

#include <ATen/ATen.h>

#include "checkpoint.h"
#include "convert.h"
#include "model.h"

namespace fs = std::filesystem;
using namespace pithtrain;

namespace {
std::string g_hf_dir;
}

TEST(Parity, LogitsLossAndGradientsMatchTransformers) {
  ASSERT_FALSE(g_hf_dir.empty()) << "usage: test_parity HF_DIR (made by tests/parity/make_reference.py)";
  const fs::path imported = fs::path(g_hf_dir) / "pithtrain";
  import_hf(g_hf_dir, imported.string());

  Options config = Options::from_file((imported / "config.toml").string());
  if (config.table("model").table("moe").table("router").text("plugin", "") == "topk_softmax")
    config.set_override("model.moe.router.aux_loss_coeff=0.0");  // transformers' loss leaves the router loss out
  PluginRegistry registry({PITHTRAIN_PLUGIN_DIR}, {});
  PluginContext context;
  context.logger = &logger();
  Model model(config.table("model"), registry, context);
  SafetensorsFile weights = load_safetensors((imported / "model.safetensors").string());
  copy_tensors_by_name(weights, model.state(), "", (imported / "model.safetensors").string());

  SafetensorsFile reference = load_safetensors((fs::path(g_hf_dir) / "reference.safetensors").string());
  ModelOutput output = model.forward(*reference.find("tokens"));
  output.loss.backward();

  const at::Tensor& logits = *reference.find("logits");
  const double scale = logits.abs().max().item<double>();
  const double logit_error = (output.logits.detach() - logits).abs().max().item<double>();
  EXPECT_LT(logit_error, 1e-4 * scale) << "max |logits difference| " << logit_error << " at logits scale " << scale;
  const double loss = reference.find("loss")->item<double>();
  EXPECT_NEAR(output.loss.item<double>(), loss, 1e-5 * loss);

  int compared = 0;
  for (const auto& parameter : model.parameters()) {
    const at::Tensor* expected = reference.find("grad/" + parameter.name);
    ASSERT_NE(expected, nullptr) << "no reference gradient for " << parameter.name;
    ASSERT_TRUE(parameter.tensor.grad().defined()) << parameter.name;
    const double grad_scale = std::max(expected->abs().max().item<double>(), 1e-12);
    const double error = (parameter.tensor.grad() - *expected).abs().max().item<double>();
    EXPECT_LT(error, 1e-4 * grad_scale) << parameter.name << ": max difference " << error << " at scale " << grad_scale;
    ++compared;
  }
  EXPECT_EQ(compared, static_cast<int>(reference.tensors.size()) - 3) << "every transformers parameter is compared";
  std::printf("logits max difference %.3g (scale %.3g), loss %.8f vs %.8f, %d gradients compared\n", logit_error, scale,
              output.loss.item<double>(), loss, compared);
}

TEST(Parity, ExportRoundTripIsBitExact) {
  ASSERT_FALSE(g_hf_dir.empty());
  const fs::path imported = fs::path(g_hf_dir) / "pithtrain_roundtrip", exported = fs::path(g_hf_dir) / "exported";
  import_hf(g_hf_dir, imported.string());
  export_hf((imported / "config.toml").string(), (imported / "model.safetensors").string(), exported.string());
  SafetensorsFile original = load_safetensors((fs::path(g_hf_dir) / "model.safetensors").string());
  SafetensorsFile round_trip = load_safetensors((exported / "model.safetensors").string());
  ASSERT_EQ(original.tensors.size(), round_trip.tensors.size());
  for (const auto& tensor : original.tensors) {
    const at::Tensor* other = round_trip.find(tensor.name);
    ASSERT_NE(other, nullptr) << tensor.name << " is missing after the round trip";
    EXPECT_TRUE(at::equal(tensor.tensor, *other)) << tensor.name << " changed";
  }
  // Importing the export again gives the same PithTrain weights.
  import_hf(exported.string(), (fs::path(g_hf_dir) / "reimported").string());
  SafetensorsFile first = load_safetensors((imported / "model.safetensors").string());
  SafetensorsFile second = load_safetensors((fs::path(g_hf_dir) / "reimported" / "model.safetensors").string());
  for (const auto& tensor : first.tensors) EXPECT_TRUE(at::equal(tensor.tensor, *second.find(tensor.name))) << tensor.name;
}

TEST(Parity, MissingAndMisshapenTensorsAreNamed) {
  ASSERT_FALSE(g_hf_dir.empty());
  const fs::path broken = fs::path(g_hf_dir) / "broken";
  fs::create_directories(broken);
  fs::copy_file(fs::path(g_hf_dir) / "config.json", broken / "config.json", fs::copy_options::overwrite_existing);
  SafetensorsFile original = load_safetensors((fs::path(g_hf_dir) / "model.safetensors").string());
  std::vector<NamedTensor> without_norm;
  for (const auto& tensor : original.tensors)
    if (tensor.name != "model.norm.weight") without_norm.push_back(tensor);
  save_safetensors((broken / "model.safetensors").string(), without_norm);
  try {
    import_hf(broken.string(), (broken / "out").string());
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("'model.norm.weight' is missing"), std::string::npos) << error.what();
  }
  std::vector<NamedTensor> misshapen = original.tensors;
  for (auto& tensor : misshapen)
    if (tensor.name == "lm_head.weight") tensor.tensor = tensor.tensor.narrow(0, 0, 5).clone();
  save_safetensors((broken / "model.safetensors").string(), misshapen);
  try {
    import_hf(broken.string(), (broken / "out").string());
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("'lm_head.weight' has shape [5, 48]"), std::string::npos) << error.what();
  }
}

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (argc > 1) g_hf_dir = argv[1];
  return RUN_ALL_TESTS();
}
