// `pithtrain eval` (eval_run.h): the run's resolved config rebuilt for one process, its weights loaded,
// and Trainer::evaluate_weights on the chosen windows, so the validation number is the run's own.
#include "eval_run.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <toml++/toml.h>

#include "checkpoint.h"
#include "data.h"
#include "json.h"
#include "pithtrain/error.h"
#include "trainer.h"

namespace pithtrain {
namespace fs = std::filesystem;

// The run's config.toml for one process. A run of several processes (parallel.* > 1) is evaluated in one:
// its mesh and schedule go, and each micro-batch takes the batch_size x parallel.data windows that all
// data ranks took together, so the validation windows are the same ones (Trainer::validation_offsets).
std::string one_process_config(const std::string& config_path) {
  toml::table config;
  try {
    config = toml::parse_file(config_path);
  } catch (const toml::parse_error& error) {
    throw Error("'" + config_path + "' is not a valid config (" + std::string(error.description()) +
                "); it is the run's resolved config as training wrote it: restore it, or pass the run directory of another run");
  }
  int64_t processes = 1, data_parallel = config["parallel"]["data"].value_or<int64_t>(1);
  for (const char* size : {"data", "expert", "pipeline", "context"}) processes *= config["parallel"][size].value_or<int64_t>(1);
  if (processes > 1) {
    config.erase("parallel");
    config.erase("schedule");  // its keys belong to the multi-process schedule; "single" is the default
    if (auto* train = config["train"].as_table()) {
      const int64_t batch_size = (*train)["batch_size"].value_or<int64_t>(16);
      train->insert_or_assign("batch_size", batch_size * data_parallel);
    }
  }
  std::ostringstream text;
  text << config;
  return text.str();
}

int64_t saved_step(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  uint64_t length = 0;
  if (!in.read(reinterpret_cast<char*>(&length), 8) || length > (64u << 20)) return -1;
  std::string header(length, '\0');
  if (!in.read(header.data(), static_cast<std::streamsize>(length))) return -1;
  try {
    const JsonValue root = parse_json(header, file);
    const JsonValue* metadata = root.find("__metadata__");
    const JsonValue* step = metadata ? metadata->find("step") : nullptr;
    return step && step->type == JsonValue::Type::String ? std::stoll(step->text) : -1;
  } catch (const std::exception&) {
    return -1;  // the loader names what is wrong with the file
  }
}

std::string run_config_path(const std::string& command, const std::string& run_dir) {
  if (run_dir.empty()) throw Error(command + ": needs --run RUN_DIR, the directory of a training run (see --help)");
  if (!fs::is_directory(run_dir))
    throw Error(command + ": run directory '" + run_dir + "' does not exist; pass the --out folder of a training run (default runs/<run.name>)");
  const fs::path config_path = fs::path(run_dir) / "config.toml";
  if (!fs::is_regular_file(config_path))
    throw Error(command + ": '" + run_dir + "' holds no config.toml, so it is not a run directory; pass the --out folder of a training run");
  return config_path.string();
}

std::string run_weights(const std::string& command, const std::string& run_dir, const std::string& weights) {
  if (!weights.empty()) {
    if (!fs::is_regular_file(weights))
      throw Error(command + ": --weights '" + weights + "': no such file; pass a model.safetensors or a checkpoint of this run");
    return weights;
  }
  const fs::path final_weights = fs::path(run_dir) / "model.safetensors";
  if (fs::is_regular_file(final_weights)) return final_weights.string();
  const auto checkpoints = CheckpointFolder(fs::path(run_dir) / "checkpoints", 1).list();
  if (checkpoints.empty())
    throw Error(command + ": '" + run_dir + "' holds no weights (neither model.safetensors nor checkpoints/step_*.safetensors); "
                "train it first, or pass --weights FILE");
  return checkpoints.front().string();
}

namespace {

std::string toml_string(const std::string& text) {
  std::string quoted = "\"";
  for (char c : text) quoted += (c == '"' || c == '\\') ? std::string("\\") + c : std::string(1, c);
  return quoted + "\"";
}

}  // namespace

EvalReport evaluate_run(const EvalRequest& request) {
  const fs::path config_path = run_config_path("eval", request.run_dir);
  EvalReport report;
  report.split = request.split.empty() ? (request.data.empty() ? "validation" : "all") : request.split;
  if (report.split != "validation" && report.split != "all")
    throw Error("eval: --split is 'validation' (the run's held-out windows) or 'all' (every window of the file), got '" + request.split + "'");

  Options options = Options::from_string(one_process_config(config_path.string()), config_path.string());
  if (!request.data.empty()) options.set_override("data.path=" + toml_string(request.data));
  for (const auto& assignment : request.sets) options.set_override(assignment);

  // The weights: named, or the run's final model.safetensors, or its newest checkpoint.
  const fs::path weights = run_weights("eval", request.run_dir, request.weights);

  // A token file of another tokenizer gets the fix for eval, not the trainer's "raise model.vocab_size".
  const toml::table config = toml::parse_file(config_path.string());
  const std::string data = request.data.empty() ? config["data"]["path"].value_or<std::string>("") : request.data;
  const int64_t vocab_size = config["model"]["vocab_size"].value_or<int64_t>(0);
  TokenFileHeader header{};
  std::ifstream token_file(data, std::ios::binary);
  if (token_file.read(reinterpret_cast<char*>(&header), sizeof(header)) && std::memcmp(header.magic, "PTTOKENS", 8) == 0 &&
      static_cast<int64_t>(header.vocab_size) > vocab_size)
    throw Error("eval: token file '" + data + "' has a vocabulary of " + std::to_string(header.vocab_size) + " but the run's model has " +
                std::to_string(vocab_size) + " (model.vocab_size): it was built with another tokenizer; rebuild it with the " +
                "tokenizer of the run's own data (docs/data.md)");

  RunSettings settings;
  settings.quiet = true;
  settings.plugin_files = request.plugins;
  settings.out_dir = request.run_dir;  // read only: eval writes nothing
  Trainer trainer(std::move(options), settings);
  report.data = trainer.config().data_path;
  report.seq_len = trainer.config().seq_len;
  const EvalFigures figures = trainer.evaluate_weights(weights.string(), report.split == "validation");
  report.weights = weights.string();
  report.step = saved_step(weights.string());
  report.loss = figures.loss;
  report.perplexity = std::exp(figures.loss);
  report.windows = figures.windows, report.targets = figures.targets, report.bytes = figures.bytes;
  // Bits per byte: the targets' cross-entropy summed, in bits, over the text bytes among them (an
  // end-of-document target is scored but is no byte). Known only for byte-level token files.
  report.bits_per_byte = figures.bytes_known && figures.bytes > 0
                             ? figures.loss * static_cast<double>(figures.targets) / (std::log(2.0) * static_cast<double>(figures.bytes))
                             : std::nan("");
  return report;
}

}  // namespace pithtrain
