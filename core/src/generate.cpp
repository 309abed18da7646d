// `pithtrain generate` (generate.h): the decoder run one new token at a time through the attention caches
// (Model::next_token_logits), the sampler, the run's tokenizer, and the loading shared with eval_run.cpp.
#include "generate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/grad_mode.h>

#include "checkpoint.h"
#include "data.h"
#include "eval_run.h"
#include "model.h"
#include "pithtrain/error.h"
#include "pithtrain/nn.h"
#include "registry.h"
#include "sentencepiece_tokenizer.h"
#include "train_config.h"

namespace pithtrain {
namespace fs = std::filesystem;

// ---- the model, one step at a time -------------------------------------------------------------------

at::Tensor Model::next_token_logits(const at::Tensor& tokens, std::vector<AttentionCache>* caches) {
  at::NoGradGuard no_grad;
  const int64_t seq = tokens.size(1);
  if (caches && caches->size() != layers_.size())
    throw Error("next_token_logits: " + std::to_string(caches->size()) + " caches for " + std::to_string(layers_.size()) + " layers");
  const int64_t start = caches ? caches->front().length : 0;
  const at::Tensor positions = at::arange(start, start + seq, at::TensorOptions().dtype(at::kLong).device(context_.device));  // [S]
  at::Tensor x = at::embedding(embedding_, tokens.to(context_.device));  // [B, S, H]
  ModelOutput unused;  // the training figures forward_layer would record (not recorded: record_routing false)
  for (size_t index = 0; index < layers_.size(); ++index) {
    at::Tensor aux_loss;  // the router's loss: nothing to train here
    x = forward_layer(layers_[index], static_cast<int64_t>(index), x, positions, unused, aux_loss, /*record_routing=*/false,
                      caches ? &(*caches)[index] : nullptr);
  }
  if (caches)
    for (auto& cache : *caches) cache.length += seq;
  return pithtrain::linear(norm(x.select(1, seq - 1), final_norm_), lm_head_);  // [B, V]
}

bool Model::attention_supports_cache() const { return attention_without_cache().empty(); }

std::string Model::attention_without_cache() const {
  for (const auto& layer : layers_)
    if (!layer.attention->supports_cache())
      for (const auto& entry : manifest_)
        if (entry.config_key == "model." + layer.attention_table + ".plugin") return entry.plugin->name();
  return {};
}

// ---- sampling ----------------------------------------------------------------------------------------

void check_sampling(const SamplingSettings& settings) {
  auto text = [](double value) {  // as written: 1.5, -1, nan (std::to_string would say -1.000000)
    std::ostringstream out;
    out << value;
    return out.str();
  };
  if (settings.max_tokens < 1)
    throw Error("generate: --max-tokens is " + std::to_string(settings.max_tokens) + "; it must be at least 1");
  if (!std::isfinite(settings.temperature) || settings.temperature < 0)
    throw Error("generate: --temperature is " + text(settings.temperature) +
                "; it must be a finite number >= 0 (0: greedy, the most likely token each time; 1: the model's own distribution)");
  if (!std::isfinite(settings.top_p) || settings.top_p <= 0 || settings.top_p > 1)
    throw Error("generate: --top-p is " + text(settings.top_p) +
                "; it must be in (0, 1] (1: no cut; 0.9: draw among the most likely tokens holding 90% of the probability)");
}

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// A uniform double in [0, 1) from the top 53 bits: the same numbers on every platform, unlike
// std::uniform_real_distribution, whose algorithm the standard leaves open.
double uniform(std::mt19937_64& random) { return static_cast<double>(random() >> 11) * 0x1.0p-53; }

}  // namespace

int64_t draw_token(const at::Tensor& logits, const SamplingSettings& settings, std::mt19937_64& random) {
  const auto values = logits.accessor<float, 1>();
  const int64_t vocab = logits.size(0);
  if (settings.temperature == 0) {
    int64_t best = 0;
    for (int64_t id = 1; id < vocab; ++id)
      if (values[id] > values[best]) best = id;
    return best;
  }
  double top = -INFINITY;
  for (int64_t id = 0; id < vocab; ++id) top = std::max(top, static_cast<double>(values[id]));
  std::vector<std::pair<double, int64_t>> ranked(vocab);  // (unnormalised probability, id)
  double total = 0;
  for (int64_t id = 0; id < vocab; ++id) total += (ranked[id] = {std::exp((values[id] - top) / settings.temperature), id}).first;
  std::sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
  size_t kept = 0;
  double mass = 0;
  while (kept < ranked.size() && (kept == 0 || mass < settings.top_p * total)) mass += ranked[kept++].first;
  double target = uniform(random) * mass;
  for (size_t i = 0; i < kept; ++i)
    if ((target -= ranked[i].first) < 0) return ranked[i].second;
  return ranked[kept - 1].second;  // rounding left a sliver above the last kept token
}

namespace {

at::Tensor token_row(const std::vector<int64_t>& tokens) { return at::tensor(tokens, at::kLong).unsqueeze(0); }  // [1, S]

}  // namespace

Generation generate_tokens(Model& model, const std::vector<int64_t>& prompt, const SamplingSettings& settings,
                           const std::function<void(int64_t)>& on_token) {
  check_sampling(settings);
  if (prompt.empty()) throw Error("generate: the prompt has no tokens (it needs at least the end-of-document token it starts after)");
  Generation generation;
  generation.cached = settings.use_cache && model.attention_supports_cache();
  std::vector<AttentionCache> caches(generation.cached ? model.dims().num_layers : 0);
  std::vector<AttentionCache>* layer_caches = generation.cached ? &caches : nullptr;
  std::vector<int64_t> sequence = prompt;  // the prefix: what the uncached path feeds each time
  std::mt19937_64 random(settings.seed);
  const int64_t vocab = settings.vocab_limit > 0 ? std::min(settings.vocab_limit, model.dims().vocab_size) : model.dims().vocab_size;

  const auto start = Clock::now();
  at::Tensor logits = model.next_token_logits(token_row(prompt), layer_caches);  // [1, V]
  generation.prompt_seconds = seconds_since(start);
  for (int64_t index = 0; index < settings.max_tokens; ++index) {
    const at::Tensor row = logits[0].narrow(0, 0, vocab).to(at::kCPU, at::kFloat).contiguous();  // [vocab]
    if (settings.keep_logits) generation.logits.push_back(row.clone());
    const int64_t token = draw_token(row, settings, random);
    generation.tokens.push_back(token);
    sequence.push_back(token);
    if (on_token) on_token(token);
    if (token == settings.stop_token) {
      generation.stopped = true;
      break;
    }
    if (index + 1 == settings.max_tokens) break;  // the logits after the last token are not needed
    // With caches only the new token goes in; without, the whole prefix again.
    logits = model.next_token_logits(token_row(generation.cached ? std::vector<int64_t>{token} : sequence), layer_caches);
  }
  generation.seconds = seconds_since(start);
  return generation;
}

// ---- the run's tokenizer ------------------------------------------------------------------------------

namespace {

// Bytes (ids 0..255 are bytes, 256 ends a document) or a SentencePiece model (its </s> ends one).
class TextCodec {
 public:
  // `flag` is --tokenizer ("bytes" or a .model file); empty: the tokenizer the run's token file names.
  TextCodec(const std::string& flag, const std::string& data_path) {
    if (flag == "bytes") return;
    if (!flag.empty()) {
      if (!fs::is_regular_file(flag))
        throw Error("generate: --tokenizer '" + flag + "': no such file; pass bytes, or the SentencePiece .model file the run's data was built with");
      open_sentencepiece(flag, "--tokenizer");
      return;
    }
    TokenFileHeader header{};
    std::ifstream file(data_path, std::ios::binary);
    if (!file.read(reinterpret_cast<char*>(&header), sizeof(header)) || std::memcmp(header.magic, "PTTOKENS", 8) != 0)
      throw Error("generate: cannot tell which tokenizer the run used: its data.path '" + data_path +
                  "' (whose header names it) cannot be read as a token file from here; pass --tokenizer bytes or --tokenizer FILE.model");
    if (header.tokenizer == 1) return;
    if (header.tokenizer == 2) {
      // `pithtrain data build` writes its trained model beside the tokens as FILE.model (docs/data.md).
      const std::string model = data_path + ".model";
      if (!fs::is_regular_file(model))
        throw Error("generate: the run's token file '" + data_path + "' was built with SentencePiece, but '" + model +
                    "' (where data build keeps its model) is not there; pass --tokenizer FILE.model, the --tokenizer-model it was built with");
      open_sentencepiece(model, "the run's data.path");
      return;
    }
    throw Error("generate: the run's token file '" + data_path + "' was built with a " +
                (header.tokenizer == 3 ? std::string("Hugging Face tokenizer.json (scripts/tokenize_hf.py)")
                                       : "tokenizer of id " + std::to_string(header.tokenizer)) +
                ", which generate cannot run; it reads byte-level and SentencePiece runs (--tokenizer bytes or FILE.model)");
  }

  std::string name() const { return sentencepiece_ ? "sentencepiece " + model_ : "bytes"; }
  int64_t vocab_size() const { return sentencepiece_ ? static_cast<int64_t>(sentencepiece_->vocab_size()) : kByteVocabSize; }
  int64_t end_of_document() const { return sentencepiece_ ? sentencepiece_->end_of_document() : kEndOfDocument; }

  std::vector<int64_t> encode(const std::string& text) const {
    std::vector<int64_t> ids;
    if (!sentencepiece_) {
      for (unsigned char byte : text) ids.push_back(byte);
      return ids;
    }
    std::vector<uint32_t> pieces;
    sentencepiece_->encode(text, pieces);
    for (uint32_t piece : pieces) {
      if (static_cast<int64_t>(piece) == sentencepiece_->unknown())
        throw Error("generate: --prompt holds text the SentencePiece model '" + model_ +
                    "' cannot encode (it becomes <unk>, which the model never saw); leave those characters out, or use a model "
                    "trained with byte fallback (pithtrain data build --train-vocab does)");
      ids.push_back(piece);
    }
    return ids;
  }

  // The text of `ids` (no end-of-document among them).
  std::string decode(const std::vector<int64_t>& ids) const {
    if (!sentencepiece_) {
      std::string text;
      for (int64_t id : ids) text += static_cast<char>(id);
      return text;
    }
    return sentencepiece_->decode(std::vector<uint32_t>(ids.begin(), ids.end()));
  }

  bool byte_level() const { return !sentencepiece_; }

 private:
  void open_sentencepiece(const std::string& model, const std::string& from) {
    try {
      sentencepiece_ = std::make_shared<SentencePieceEncoder>(model);
    } catch (const Error& error) {
      throw Error("generate: " + from + ": " + error.what());
    }
    model_ = model;
  }

  std::shared_ptr<SentencePieceEncoder> sentencepiece_;  // null: bytes
  std::string model_;
};

// Copies the file's tensors into the model's, by name: every parameter, and router buffers the file has.
void load_weights(Model& model, const std::string& weights, const std::string& config_path) {
  const SafetensorsFile file = load_safetensors(weights);
  const std::string prefix = file.find("model/embedding.weight") ? "model/" : "";  // a checkpoint's names
  std::vector<NamedTensor> targets;
  std::vector<std::string> parameters;
  for (const auto& parameter : model.parameters()) parameters.push_back(parameter.name);
  for (const auto& item : model.state()) {
    const at::Tensor* stored = file.find(prefix + item.name);
    const bool is_parameter = std::find(parameters.begin(), parameters.end(), item.name) != parameters.end();
    if (stored == nullptr && !is_parameter) continue;  // a router buffer the file lacks starts at zero, as in training
    if (stored == nullptr)
      throw Error("generate: '" + weights + "' has no tensor '" + prefix + item.name + "', so it holds another model than '" + config_path +
                  "' describes; pass the config.toml of the run that wrote these weights");
    if (stored->sizes() != item.tensor.sizes())
      throw Error("generate: '" + weights + "': tensor '" + prefix + item.name + "' has shape " + c10::str(stored->sizes()) + " but '" +
                  config_path + "' makes it " + c10::str(item.tensor.sizes()) + "; pass the config.toml of the run that wrote these weights");
    targets.push_back(item);
  }
  copy_tensors_by_name(file, targets, prefix, weights);
}

std::string checked_device(const std::string& device, const std::string& from) {
  if (device != "cpu" && device.rfind("cuda", 0) != 0) throw Error("generate: " + from + " '" + device + "': use cpu, cuda or cuda:N");
  if (device == "cpu") return device;
  const int64_t gpus = at::hasCUDA() ? static_cast<int64_t>(at::getNumGPUs()) : 0;
  const int64_t index = device.size() > 5 ? std::atoll(device.c_str() + 5) : 0;
  if (index >= gpus)
    throw Error("generate: " + from + " is '" + device + "' but this machine has " + std::to_string(gpus) +
                " usable GPU(s); pass --device cpu" + (gpus > 0 ? " or --device cuda:0" : ""));
  return device;
}

}  // namespace

GenerateReport generate_text(const GenerateRequest& request, const std::function<void(const std::string&)>& on_note,
                             const std::function<void(const std::string&)>& on_text) {
  // The flags first (no file is touched for a bad one), then which config and weights: a run
  // directory, or a config and weights named apart.
  if (!request.has_prompt)
    throw Error("generate: needs --prompt TEXT, the text to continue (--prompt '' starts a new document from nothing)");
  check_sampling(request.sampling);
  std::string config_path, weights;
  if (!request.run_dir.empty() && !request.config.empty())
    throw Error("generate: pass --run RUN_DIR, or --config FILE with --weights FILE, not both");
  if (!request.config.empty()) {
    if (!fs::is_regular_file(request.config))
      throw Error("generate: --config '" + request.config + "': no such file; pass a run's config.toml, or --run RUN_DIR");
    if (request.weights.empty())
      throw Error("generate: --config needs --weights FILE, the model.safetensors or checkpoint to sample from (or pass --run RUN_DIR, "
                  "which holds both)");
    config_path = request.config;
    weights = run_weights("generate", "", request.weights);
  } else {
    if (request.run_dir.empty())
      throw Error("generate: needs --run RUN_DIR (a training run's folder), or --config FILE with --weights FILE (see pithtrain generate --help)");
    config_path = run_config_path("generate", request.run_dir);
    weights = run_weights("generate", request.run_dir, request.weights);
  }

  Options options = Options::from_string(one_process_config(config_path), config_path);
  for (const auto& assignment : request.sets) options.set_override(assignment);
  const TrainConfig train = read_train_config(options, 1);
  GenerateReport report;
  report.device = request.device.empty() ? checked_device(train.device, "the run's train.device") : checked_device(request.device, "--device");
  report.dtype = train.dtype;

  const TextCodec codec(request.tokenizer, train.data_path);  // before the model: a wrong one fails fast
  report.tokenizer = codec.name();

  PluginRegistry registry(default_search_dirs(options.table("plugins").text_list("paths", {})), request.plugins);
  PluginContext context;
  context.device = c10::Device(report.device);
  context.dtype = train.dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
  context.logger = &logger();
  at::manual_seed(train.seed);  // the initial values, overwritten by the weights
  Model model(options.table("model"), registry, context);
  // The plugin the note below names: the one without a cache path, else the first (per-layer attention).
  report.attention = model.attention_without_cache();
  if (report.attention.empty()) report.attention = model.manifest().front().plugin->name();
  load_weights(model, weights, config_path);
  report.weights = weights;
  report.step = saved_step(weights);

  const int64_t vocab = model.dims().vocab_size;
  if (codec.end_of_document() >= vocab)
    throw Error("generate: the tokenizer (" + codec.name() + ") ends documents with token " + std::to_string(codec.end_of_document()) +
                ", which the model's vocabulary of " + std::to_string(vocab) + " (model.vocab_size) lacks: it is not the run's tokenizer; "
                "pass the run's --tokenizer");
  // The prompt is read as the start of a document: in a token file every document but the first follows
  // an end-of-document token, so the model has learnt what begins one after it.
  report.prompt_tokens = {codec.end_of_document()};
  for (int64_t id : codec.encode(request.prompt)) {
    if (id >= vocab)
      throw Error("generate: --prompt encodes to token " + std::to_string(id) + " (" + codec.name() + "), beyond the model's vocabulary of " +
                  std::to_string(vocab) + " (model.vocab_size): it is not the run's tokenizer; pass the run's --tokenizer");
    report.prompt_tokens.push_back(id);
  }

  SamplingSettings sampling = request.sampling;
  sampling.vocab_limit = codec.vocab_size();
  sampling.stop_token = codec.end_of_document();
  if (on_note) {
    if (!model.attention_supports_cache())
      on_note("attention plugin '" + report.attention + "' has no cache path (Attention::supports_cache), so every new token "
              "recomputes the whole prefix: the same tokens, more slowly");
    else if (!sampling.use_cache)
      on_note("--no-cache: every new token recomputes the whole prefix");
  }

  // The text as it is decoded: a byte at a time, or (SentencePiece) what the new pieces add to the
  // decoded prompt (decoded alone, a first piece would lose its leading space), held back while it
  // ends inside a character (U+FFFD).
  std::vector<int64_t> text_tokens(report.prompt_tokens.begin() + 1, report.prompt_tokens.end());  // the prompt's, then the new
  const std::string prompt_text = codec.byte_level() ? std::string() : codec.decode(text_tokens);
  auto new_text = [&] {
    const std::string whole = codec.decode(text_tokens);
    return whole.compare(0, prompt_text.size(), prompt_text) == 0 ? whole.substr(prompt_text.size()) : whole;
  };
  int64_t length = static_cast<int64_t>(report.prompt_tokens.size());
  if (on_text) on_text(request.prompt);  // only now: a failed load prints nothing on stdout
  report.generation = generate_tokens(model, report.prompt_tokens, sampling, [&](int64_t token) {
    if (++length == train.seq_len + 1 && on_note)
      on_note("the text is now longer than the " + std::to_string(train.seq_len) +
              " tokens (train.seq_len) the model was trained on: what follows may lose its thread");
    if (token == sampling.stop_token) return;
    text_tokens.push_back(token);
    if (codec.byte_level()) {
      report.text += static_cast<char>(token);
      if (on_text) on_text(std::string(1, static_cast<char>(token)));
      return;
    }
    const std::string decoded = new_text();
    const bool complete = decoded.size() < 3 || decoded.compare(decoded.size() - 3, 3, "\xEF\xBF\xBD") != 0;
    if (complete && decoded.compare(0, report.text.size(), report.text) == 0) {
      if (on_text) on_text(decoded.substr(report.text.size()));
      report.text = decoded;
    }
  });
  if (!codec.byte_level()) {
    const std::string decoded = new_text();
    if (on_text && decoded.compare(0, report.text.size(), report.text) == 0) on_text(decoded.substr(report.text.size()));
    report.text = decoded;
  }
  return report;
}

std::string valid_utf8(const std::string& text) {
  std::string out;
  for (size_t i = 0; i < text.size();) {
    const unsigned char lead = static_cast<unsigned char>(text[i]);
    // The length of the character `lead` starts and the smallest code point of that length (overlong
    // forms are not well-formed); 0: not a lead byte.
    const size_t length = lead < 0x80 ? 1 : (lead >> 5) == 0x6 ? 2 : (lead >> 4) == 0xE ? 3 : (lead >> 3) == 0x1E ? 4 : 0;
    uint32_t code = length == 1 ? lead : length == 2 ? lead & 0x1F : length == 3 ? lead & 0x0F : lead & 0x07;
    bool good = length > 0 && i + length <= text.size();
    for (size_t k = 1; good && k < length; ++k) {
      const unsigned char next = static_cast<unsigned char>(text[i + k]);
      good = (next & 0xC0) == 0x80;
      code = (code << 6) | (next & 0x3F);
    }
    const uint32_t smallest[] = {0, 0, 0x80, 0x800, 0x10000};
    good = good && code >= smallest[length] && code <= 0x10FFFF && !(code >= 0xD800 && code <= 0xDFFF);
    if (good) out.append(text, i, length), i += length;
    else out += "\xEF\xBF\xBD", i += 1;
  }
  return out;
}

}  // namespace pithtrain
