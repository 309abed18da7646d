// Parity with transformers: a model imported with `pithtrain convert import` computes the same logits,
// loss and gradients as transformers on the same tokens. The reference comes from
// tests/parity/make_reference.py (run by tests/test_parity.sh, which passes the folder in argv).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <regex>

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
  SafetensorsFile reference = load_safetensors((fs::path(g_hf_dir) / "reference.safetensors").string());
  // deepseek_v3_mtp: the reference's loss adds its multi-token prediction loss, with its coefficient.
  if (const at::Tensor* coeff = reference.find("mtp_loss_coeff"))
    config.set_override("model.mtp_loss_coeff=" + std::to_string(coeff->item<double>()));
  PluginRegistry registry({PITHTRAIN_PLUGIN_DIR}, {});
  PluginContext context;
  context.logger = &logger();
  Model model(config.table("model"), registry, context);
  SafetensorsFile weights = load_safetensors((imported / "model.safetensors").string());
  copy_tensors_by_name(weights, model.state(), "", (imported / "model.safetensors").string());

  ModelOutput output = model.forward(*reference.find("tokens"));
  output.loss.backward();

  const at::Tensor& logits = *reference.find("logits");
  const double scale = logits.abs().max().item<double>();
  const double logit_error = (output.logits.detach() - logits).abs().max().item<double>();
  EXPECT_LT(logit_error, 1e-4 * scale) << "max |logits difference| " << logit_error << " at logits scale " << scale;
  const double loss = reference.find("loss")->item<double>();
  EXPECT_NEAR(output.loss.item<double>(), loss, 1e-5 * loss);
  if (const at::Tensor* mtp_loss = reference.find("mtp_loss")) {
    ASSERT_TRUE(output.mtp_loss.defined()) << "the imported model has no multi-token prediction";
    EXPECT_NEAR(output.mtp_loss.item<double>(), mtp_loss->item<double>(), 1e-5 * mtp_loss->item<double>());
    std::printf("MTP loss %.8f vs the reference's %.8f\n", output.mtp_loss.item<double>(), mtp_loss->item<double>());
  }

  int compared = 0;
  double worst = 0;  // the largest gradient error relative to its tensor's largest magnitude
  std::string worst_name;
  for (const auto& parameter : model.parameters()) {
    const at::Tensor* expected = reference.find("grad/" + parameter.name);
    ASSERT_NE(expected, nullptr) << "no reference gradient for " << parameter.name;
    ASSERT_TRUE(parameter.tensor.grad().defined()) << parameter.name;
    const double grad_scale = std::max(expected->abs().max().item<double>(), 1e-12);
    const double error = (parameter.tensor.grad() - *expected).abs().max().item<double>();
    EXPECT_LT(error, 1e-4 * grad_scale) << parameter.name << ": max difference " << error << " at scale " << grad_scale;
    if (error / grad_scale > worst) worst = error / grad_scale, worst_name = parameter.name;
    ++compared;
  }
  int references = 0;
  for (const auto& tensor : reference.tensors) references += tensor.name.rfind("grad/", 0) == 0;
  EXPECT_EQ(compared, references) << "every transformers parameter is compared";
  std::printf("logits max difference %.3g (scale %.3g), loss %.8f vs %.8f, %d gradients compared (worst %.3g of its scale: %s)\n",
              logit_error, scale, output.loss.item<double>(), loss, compared, worst, worst_name.c_str());
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

// Qwen3-Next / Qwen3.5 only: the published checkpoints' multi-token prediction tensors (mtp.*) are skipped (and
// Qwen3.5's vision tower, when the folder is its vision-language model), and
// a config.json this model cannot hold is refused naming its key; an exported config that lacks what the
// architecture always has is refused naming the PithTrain key.
TEST(Parity, HybridMtpSkippedAndUnsupportedKeysNamed) {
  ASSERT_FALSE(g_hf_dir.empty());
  std::ifstream config_in(fs::path(g_hf_dir) / "config.json");
  const std::string config_json((std::istreambuf_iterator<char>(config_in)), std::istreambuf_iterator<char>());
  if (config_json.find("\"linear_num_key_heads\"") == std::string::npos) GTEST_SKIP() << "not a hybrid architecture";
  const fs::path work = fs::path(g_hf_dir) / "hybrid_checks";
  fs::create_directories(work);
  SafetensorsFile original = load_safetensors((fs::path(g_hf_dir) / "model.safetensors").string());
  // A Hugging Face folder of `json` and the reference weights (one new folder each: fs::remove_all would bind
  // to the copy inside libtorch.so, which crashes).
  int folders = 0;
  fs::path folder;
  auto write_folder = [&](const std::string& json, bool with_mtp, const std::vector<NamedTensor>& weights = {}) {
    folder = work / ("hf" + std::to_string(folders++));
    fs::create_directories(folder);
    std::ofstream(folder / "config.json") << json;
    std::vector<NamedTensor> tensors = weights.empty() ? original.tensors : weights;
    if (with_mtp)
      tensors.insert(tensors.end(), {{"mtp.fc.weight", at::ones({4, 4})}, {"mtp.layers.0.input_layernorm.weight", at::ones({4})}});
    save_safetensors((folder / "model.safetensors").string(), tensors);
  };
  // With an MTP layer the main model imports unchanged.
  write_folder(std::regex_replace(config_json, std::regex("\\{"), "{\n  \"mtp_num_hidden_layers\": 1,",
                                  std::regex_constants::format_first_only), true);
  import_hf(folder.string(), (work / "with_mtp").string());
  import_hf(g_hf_dir, (work / "plain").string());
  SafetensorsFile with_mtp = load_safetensors((work / "with_mtp" / "model.safetensors").string());
  SafetensorsFile plain = load_safetensors((work / "plain" / "model.safetensors").string());
  ASSERT_EQ(with_mtp.tensors.size(), plain.tensors.size());
  for (const auto& tensor : plain.tensors) EXPECT_TRUE(at::equal(tensor.tensor, *with_mtp.find(tensor.name))) << tensor.name;

  // Qwen3.5 as published: a vision-language folder whose language model is the same text model.
  if (config_json.find("\"qwen3_5_moe_text\"") != std::string::npos) {
    std::vector<NamedTensor> multimodal = {{"model.visual.patch_embed.proj.weight", at::ones({4, 3})}};
    for (const auto& tensor : original.tensors)
      multimodal.push_back({tensor.name.rfind("model.", 0) == 0 ? "model.language_model." + tensor.name.substr(6) : tensor.name,
                            tensor.tensor});
    write_folder("{\"architectures\": [\"Qwen3_5MoeForConditionalGeneration\"], \"model_type\": \"qwen3_5_moe\", "
                 "\"tie_word_embeddings\": false, \"vision_config\": {\"depth\": 1}, \"text_config\": " + config_json + "}",
                 true, multimodal);
    import_hf(folder.string(), (work / "multimodal").string());
    SafetensorsFile language_model = load_safetensors((work / "multimodal" / "model.safetensors").string());
    ASSERT_EQ(language_model.tensors.size(), plain.tensors.size());
    for (const auto& tensor : plain.tensors) EXPECT_TRUE(at::equal(tensor.tensor, *language_model.find(tensor.name))) << tensor.name;
  }

  auto import_error = [&](const std::string& json) {
    write_folder(json, false);
    try {
      import_hf(folder.string(), (folder / "out").string());
    } catch (const Error& error) {
      return std::string(error.what());
    }
    return std::string("no error");
  };
  const std::string odd_shared = std::regex_replace(config_json, std::regex("\"shared_expert_intermediate_size\": [0-9]+"),
                                                    "\"shared_expert_intermediate_size\": 36");
  EXPECT_NE(import_error(odd_shared).find("shared_expert_intermediate_size = 36 is not a positive multiple of moe_intermediate_size"),
            std::string::npos) << import_error(odd_shared);
  const std::string sliding = std::regex_replace(config_json, std::regex("\"linear_attention\""), "\"sliding_attention\"",
                                                 std::regex_constants::format_first_only);
  EXPECT_NE(import_error(sliding).find("layer type 'sliding_attention' is not supported"), std::string::npos) << import_error(sliding);

  // Export: a config without the zero-centred norms would give transformers a different model.
  std::ifstream toml_in(work / "plain" / "config.toml");
  std::string toml((std::istreambuf_iterator<char>(toml_in)), std::istreambuf_iterator<char>());
  toml = std::regex_replace(toml, std::regex("norm_zero_centered = true\n"), "", std::regex_constants::format_first_only);
  std::ofstream(work / "plain" / "changed.toml") << toml;
  try {
    export_hf((work / "plain" / "changed.toml").string(), (work / "plain" / "model.safetensors").string(), (work / "exported").string());
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("model.norm_zero_centered must be true to export as"), std::string::npos) << error.what();
  }
  EXPECT_FALSE(fs::exists(work / "exported")) << "a refused export writes nothing";
}

// GLM-4.5 and MiniMax-M2 only: the multi-token prediction layers their published checkpoints carry after the main
// layers (model.layers.L.*, L = num_hidden_layers) are skipped when config.json names them, and refused otherwise.
TEST(Parity, MtpLayersAfterTheMainLayersSkipped) {
  ASSERT_FALSE(g_hf_dir.empty());
  std::ifstream config_in(fs::path(g_hf_dir) / "config.json");
  const std::string config_json((std::istreambuf_iterator<char>(config_in)), std::istreambuf_iterator<char>());
  const bool glm = config_json.find("\"glm4_moe\"") != std::string::npos;
  if (!glm && config_json.find("\"minimax_m2\"") == std::string::npos) GTEST_SKIP() << "not glm4_moe or minimax_m2";
  const fs::path work = fs::path(g_hf_dir) / "mtp_checks";
  SafetensorsFile original = load_safetensors((fs::path(g_hf_dir) / "model.safetensors").string());
  std::vector<NamedTensor> tensors = original.tensors;  // the reference has 2 layers: its MTP layer would be layer 2
  tensors.insert(tensors.end(), {{"model.layers.2.eh_proj.weight", at::ones({48, 96})},
                                 {"model.layers.2.input_layernorm.weight", at::ones({48})}});
  const std::string key = glm ? "num_nextn_predict_layers" : "num_mtp_modules";
  auto import_with = [&](const std::string& name, int64_t mtp) {
    const fs::path folder = work / name;
    fs::create_directories(folder);
    std::string json = std::regex_replace(config_json, std::regex("\"" + key + "\": [0-9]+,?"), "");
    json = std::regex_replace(json, std::regex("\\{"), "{\n  \"" + key + "\": " + std::to_string(mtp) + ",",
                              std::regex_constants::format_first_only);
    std::ofstream(folder / "config.json") << json;
    save_safetensors((folder / "model.safetensors").string(), tensors);
    import_hf(folder.string(), (folder / "out").string());
    return load_safetensors((folder / "out" / "model.safetensors").string());
  };
  SafetensorsFile with_mtp = import_with("with_mtp", 1);
  import_hf(g_hf_dir, (work / "plain").string());
  SafetensorsFile plain = load_safetensors((work / "plain" / "model.safetensors").string());
  ASSERT_EQ(with_mtp.tensors.size(), plain.tensors.size());
  for (const auto& tensor : plain.tensors) EXPECT_TRUE(at::equal(tensor.tensor, *with_mtp.find(tensor.name))) << tensor.name;
  try {
    import_with("without_key", 0);
    FAIL() << "expected an error: layer 2 is no MTP layer when config.json names none";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("tensor 'model.layers.2."), std::string::npos) << error.what();
  }
}

// GLM-4.5 and MiniMax-M2: a config.json naming what their transformers models do not compute is refused naming the
// key, and an export whose config would give transformers another model is refused naming the PithTrain key.
TEST(Parity, Glm4MoeAndMiniMaxM2UnsupportedKeysNamed) {
  ASSERT_FALSE(g_hf_dir.empty());
  std::ifstream config_in(fs::path(g_hf_dir) / "config.json");
  const std::string config_json((std::istreambuf_iterator<char>(config_in)), std::istreambuf_iterator<char>());
  const bool glm = config_json.find("\"glm4_moe\"") != std::string::npos;
  if (!glm && config_json.find("\"minimax_m2\"") == std::string::npos) GTEST_SKIP() << "not glm4_moe or minimax_m2";
  const fs::path work = fs::path(g_hf_dir) / "refusals";
  fs::create_directories(work);
  int folders = 0;
  // The reference folder with config.json's first match of `from` replaced (by default: `key` added first).
  auto import_error = [&](const std::string& key, const std::string& from = "\\{", const std::string& to = "") {
    const fs::path folder = work / ("hf" + std::to_string(folders++));
    fs::create_directories(folder);
    std::ofstream(folder / "config.json") << std::regex_replace(config_json, std::regex(from), to.empty() ? "{\n  " + key + "," : to,
                                                                 std::regex_constants::format_first_only);
    fs::copy_file(fs::path(g_hf_dir) / "model.safetensors", folder / "model.safetensors");
    try {
      import_hf(folder.string(), (folder / "out").string());
    } catch (const Error& error) {
      return std::string(error.what());
    }
    return std::string("no error");
  };
  auto export_error = [&](const std::string& from, const std::string& to) {  // the import's config.toml, edited
    const fs::path folder = work / ("export" + std::to_string(folders++));
    import_hf(g_hf_dir, (folder / "imported").string());
    std::ifstream toml_in(folder / "imported" / "config.toml");
    const std::string toml((std::istreambuf_iterator<char>(toml_in)), std::istreambuf_iterator<char>());
    EXPECT_NE(toml.find(from), std::string::npos) << from;
    std::ofstream(folder / "changed.toml") << std::regex_replace(toml, std::regex(from), to);
    try {
      export_hf((folder / "changed.toml").string(), (folder / "imported" / "model.safetensors").string(), (folder / "hf").string());
    } catch (const Error& error) {
      EXPECT_FALSE(fs::exists(folder / "hf")) << "a refused export writes nothing";
      return std::string(error.what());
    }
    return std::string("no error");
  };
  std::string error = import_error("", "\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\"");
  EXPECT_NE(error.find("hidden_act 'gelu' (SwiGLU experts use silu) is not supported"), std::string::npos) << error;
  error = export_error("plugin = \"aux_free\"", "plugin = \"topk_softmax\"");
  EXPECT_NE(error.find("model.moe.router.plugin must be \"aux_free\""), std::string::npos) << error;
  if (glm) {
    error = export_error("qkv_bias = true", "bias = true");
    EXPECT_NE(error.find("glm4_moe has biases on q, k and v only (model.attention.qkv_bias, not bias)"), std::string::npos) << error;
  } else {
    error = import_error("\"attn_type_list\": [0, 1]");
    EXPECT_NE(error.find("attn_type_list with lightning (linear) attention layers is not supported"), std::string::npos) << error;
    error = import_error("\"qk_norm_type\": \"per_head\"");
    EXPECT_NE(error.find("qk_norm_type 'per_head'"), std::string::npos) << error;
    error = import_error("\"shared_intermediate_size\": 16");
    EXPECT_NE(error.find("a shared expert (shared_intermediate_size > 0) is not supported"), std::string::npos) << error;
    error = export_error("qk_norm = \"full\"", "qk_norm = \"head\"");
    EXPECT_NE(error.find("model.attention.qk_norm must be \"full\" to export as minimax_m2"), std::string::npos) << error;
  }
}

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (argc > 1) g_hf_dir = argv[1];
  return RUN_ALL_TESTS();
}
