// `pithtrain generate`: text sampled token by token from a run's model, through each attention layer's
// cache (Attention::forward_cached) or, for a plugin without one, by recomputing the whole prefix.
#pragma once
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace pithtrain {

class Model;

// How each next token is chosen from the model's logits.
struct SamplingSettings {
  int64_t max_tokens = 128;  // --max-tokens: new tokens at most
  double temperature = 1.0;  // --temperature: 0 is greedy (the most likely token, deterministic), else softmax(logits / T)
  double top_p = 1.0;        // --top-p: draw only among the most likely tokens whose probabilities reach top_p together
  uint64_t seed = 0;         // --seed: the sampler's random stream (std::mt19937_64), so a command repeats its text
  bool use_cache = true;     // false (--no-cache): recompute the whole prefix for every token, to check or to time
  int64_t vocab_limit = 0;   // > 0: only tokens below it are drawn (the tokenizer's vocabulary)
  int64_t stop_token = -1;   // generation ends once this token (the end of document) is drawn; -1: never
  bool keep_logits = false;  // tests: keep the logits each token was drawn from
};

// Throws Error naming the flag (--max-tokens, --temperature, --top-p) and its range.
void check_sampling(const SamplingSettings& settings);

// The next token from logits [V] (float32, CPU): at temperature 0 the most likely one (the lowest id of
// a tie); else a draw from softmax(logits / T) over the nucleus, the most likely tokens whose
// probabilities reach top_p together (at least one).
int64_t draw_token(const at::Tensor& logits, const SamplingSettings& settings, std::mt19937_64& random);

struct Generation {
  std::vector<int64_t> tokens;     // the new tokens, the stop token included when drawn
  std::vector<at::Tensor> logits;  // keep_logits: per new token, the logits it was drawn from, [vocab] float32 on the CPU
  bool cached = false;             // the caches were used (every attention has a cache path and use_cache)
  bool stopped = false;            // ended on stop_token rather than max_tokens
  double prompt_seconds = 0;       // the prompt's forward pass (which gives the first token's logits)
  double seconds = 0;              // from the start of the prompt's forward to the last token drawn
};

// Generates after `prompt` (at least one token id) with `model` on its own device, one sequence.
// `on_token` sees each new token as soon as it is drawn.
Generation generate_tokens(Model& model, const std::vector<int64_t>& prompt, const SamplingSettings& settings,
                           const std::function<void(int64_t)>& on_token = {});

// The command: which model, weights and tokenizer, and what to sample.
struct GenerateRequest {
  std::string run_dir;    // --run: config.toml and model.safetensors (else the newest checkpoint)
  std::string config;     // --config (with --weights), instead of --run
  std::string weights;    // --weights: a model.safetensors or checkpoint
  std::string tokenizer;  // --tokenizer: "bytes" or a SentencePiece .model; empty: the one the run's token file names
  std::string device;     // --device: "cpu", "cuda", "cuda:N"; empty: the run's train.device
  std::string prompt;     // --prompt
  bool has_prompt = false;
  SamplingSettings sampling;
  std::vector<std::string> sets, plugins;  // --set overrides of the config, --plugins files
};

struct GenerateReport {
  std::string weights, tokenizer, device, dtype, attention;  // what was loaded: files, device, dtype, attention plugin
  int64_t step = -1;                                         // the step the weights were saved at (-1: unknown)
  std::vector<int64_t> prompt_tokens;                        // as fed to the model: an end-of-document token, then the prompt's
  std::string text;                                          // the new text, decoded (without the end-of-document token)
  Generation generation;
};

// Loads, then generates. `on_note` gets each remark once: before generation, that every token
// recomputes the prefix (no cache path, or --no-cache); during it, that the text has grown past the
// train.seq_len tokens the model was trained on. `on_text` gets what a reader sees: the prompt once
// everything is loaded, then the new text as it is decoded. Throws Error naming the flag or file and
// the fix on bad input.
GenerateReport generate_text(const GenerateRequest& request, const std::function<void(const std::string&)>& on_note = {},
                             const std::function<void(const std::string&)>& on_text = {});

// `text` with each byte that is not part of a well-formed UTF-8 character replaced by U+FFFD: a model
// may stop inside a character or emit stray bytes, and JSON must be UTF-8 (the token ids are exact).
std::string valid_utf8(const std::string& text);

}  // namespace pithtrain
