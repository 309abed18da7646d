// The `pithtrain` command line: train (default), plugins, plugin check, data, eval, generate, plot, explain, convert.
#include <unistd.h>

#include <cctype>
#include <cmath>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include <c10/util/Exception.h>
#include <spdlog/spdlog.h>

#include "convert.h"
#include "data.h"
#include "distributed.h"
#include "eval_run.h"
#include "explain.h"
#include "generate.h"
#include "json.h"
#include "plot.h"
#include "pithtrain/conformance.h"
#include "registry.h"
#include "trainer.h"

using namespace pithtrain;

namespace {

const char* kTrainHelp = R"(usage: pithtrain [--config FILE] [--plugins A.so,B.so] [--set dotted.key=value]... [--out RUN_DIR]
       pithtrain plugins [--json] [--plugins A.so,...]
       pithtrain plugin check FILE.so
       pithtrain data build --out FILE [--format auto|text|fortune|jsonl] [--tokenizer ...] INPUT...
       pithtrain eval --run RUN_DIR [--data FILE] [--split validation|all] [--weights FILE] [--json]
       pithtrain generate --run RUN_DIR --prompt TEXT [--max-tokens N] [--temperature T] [--top-p P] [--seed S]
       pithtrain plot RUN_DIR
       pithtrain explain [--config FILE] [--set ...]
       pithtrain convert import HF_DIR --out DIR | convert export --config F --weights W --out HF_DIR
       pithtrain launch --nproc N [--nnodes M --node-rank R --master ADDR:PORT] -- [training arguments]

Trains the MoE model described by the TOML config.
  --config FILE      TOML config (docs/config.md lists every key); default: configs/tiny.toml as installed
                     beside this pithtrain (../share/pithtrain/configs/) or in its source tree (the last line)
  --plugins LIST     comma-separated plugin files to load; a bare name is looked up on the plugin search
                     path (the build's plugin folder, $PITHTRAIN_PLUGIN_PATH, config plugins.paths)
  --set KEY=VALUE    override one config key, e.g. --set model.moe.router.plugin=aux_free (repeatable)
  --out RUN_DIR      run directory: config.toml, metrics.jsonl, tensorboard/, checkpoints/, model.safetensors (default
                     runs/<run.name>); rerunning a command resumes from its newest checkpoint
  --move-aside       a new run into a RUN_DIR that holds another run first renames that run to RUN_DIR.old-N
                     (without it such a run is refused; nothing is ever deleted)
  --init-from FILE   start from these weights (a model.safetensors, e.g. from `pithtrain convert import`)
  --trace-routing FILE  record per step and MoE layer how many tokens each expert got (docs/training.md)
  --profile STEPS    profile steps A-B (or N: steps 2..N+1) with the LibTorch profiler: Chrome trace in the
                     run directory and the top operators by self time
  --help             this text; `pithtrain COMMAND --help` for a subcommand
)";

const char* kPluginsHelp = R"(usage: pithtrain plugins [--json] [--plugins A.so,...] [--config FILE]
Lists every plugin on the search path: kind, name, version, file and description.
  --json     one JSON array for machines
)";

const char* kCheckHelp = R"(usage: pithtrain plugin check FILE.so
Loads one plugin file and runs the conformance suite of its kind (docs/plugins.md), printing each check
with PASS or FAIL. Exits 0 only if every check passes.
)";

const char* kDataHelp = R"(usage: pithtrain data build --out FILE [--format F] [--tokenizer T] [--tokenizer-model M] [--train-vocab N] INPUT...
Converts text files (or folders of them) into a packed token file (docs/data.md), an end-of-document
token after each document. *.gz and *.zst files are decompressed as they are read (x.jsonl.zst is jsonl);
Parquet goes through scripts/parquet_to_jsonl.py first. Progress (bytes/s, time left) goes to stderr.
  --out FILE              the token file to write (written to FILE.tmp, renamed when complete)
  --format F              auto (default: jsonl for *.jsonl[.gz|.zst], else text), text (a file is a document),
                          fortune (documents separated by lines holding only '%'), jsonl ("text" field per line)
  --tokenizer T           bytes (default, vocab 257) or sentencepiece
  --tokenizer-model M     sentencepiece: the .model file to use (or to write, with --train-vocab)
  --train-vocab N         sentencepiece: first train a BPE model of N pieces on these inputs
Hugging Face tokenizer.json tokenizers: scripts/tokenize_hf.py writes the same format (docs/data.md).
)";

std::string g_device = "cpu";  // the device this process computes on (train.device for training)

std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> items;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ','))
    if (!item.empty()) items.push_back(item);
  return items;
}

// The whole of `value` as a number, or an Error naming the flag ("0.9x" and "hot" are refused).
double number_argument(const std::string& flag, const std::string& value) {
  size_t used = 0;
  double result = 0;
  try {
    result = std::stod(value, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != value.size()) throw Error(flag + " takes a number, got '" + value + "' (see --help)");
  return result;
}

// The whole of `value` as an integer, or an Error naming the flag (std::stoll alone would accept "2x" as 2
// and say only "stoll" for "abc").
int64_t integer_argument(const std::string& flag, const std::string& value) {
  size_t used = 0;
  int64_t result = 0;
  try {
    result = std::stoll(value, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != value.size()) throw Error(flag + " takes an integer, got '" + value + "' (see --help)");
  return result;
}

struct Arguments {
  std::string config, out, format = "auto", trace_routing, profile, tokenizer, tokenizer_model, init_from, weights;
  std::string run, data, split, prompt, device;
  int64_t train_vocab = 0;
  std::vector<std::string> plugins, sets, positional;
  bool json = false, help = false, move_aside = false, has_prompt = false;
  SamplingSettings sampling;  // generate: --max-tokens, --temperature, --top-p, --seed, --no-cache
  std::vector<std::string> generate_flags;  // which of generate's own flags were given (training refuses them)
};

Arguments parse(int argc, char** argv, int first) {
  Arguments args;
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&](const std::string& flag) -> std::string {
      if (i + 1 >= argc) throw Error(flag + " needs a value (see --help)");
      return argv[++i];
    };
    if (arg == "--help" || arg == "-h") args.help = true;
    else if (arg == "--json") args.json = true;
    else if (arg == "--move-aside") args.move_aside = true;
    else if (arg == "--config") args.config = value(arg);
    else if (arg == "--out") args.out = value(arg);
    else if (arg == "--format") args.format = value(arg);
    else if (arg == "--trace-routing") args.trace_routing = value(arg);
    else if (arg == "--tokenizer") args.tokenizer = value(arg);
    else if (arg == "--tokenizer-model") args.tokenizer_model = value(arg);
    else if (arg == "--train-vocab") args.train_vocab = integer_argument(arg, value(arg));
    else if (arg == "--profile") args.profile = value(arg);
    else if (arg == "--init-from") args.init_from = value(arg);
    else if (arg == "--weights") args.weights = value(arg);
    else if (arg == "--run") args.run = value(arg);
    else if (arg == "--data") args.data = value(arg);
    else if (arg == "--split") args.split = value(arg);
    else if (arg == "--prompt") args.prompt = value(arg), args.has_prompt = true;
    else if (arg == "--device") args.device = value(arg);
    else if (arg == "--max-tokens") args.sampling.max_tokens = integer_argument(arg, value(arg));
    else if (arg == "--temperature") args.sampling.temperature = number_argument(arg, value(arg));
    else if (arg == "--top-p") args.sampling.top_p = number_argument(arg, value(arg));
    else if (arg == "--seed") {
      const int64_t seed = integer_argument(arg, value(arg));
      if (seed < 0) throw Error("--seed takes an integer >= 0, got " + std::to_string(seed));
      args.sampling.seed = static_cast<uint64_t>(seed);
    } else if (arg == "--no-cache") args.sampling.use_cache = false;
    else if (arg == "--set") args.sets.push_back(value(arg));
    else if (arg == "--plugins") for (auto& item : split_commas(value(arg))) args.plugins.push_back(item);
    else if (arg.rfind("--", 0) == 0) throw Error("unknown option '" + arg + "' (see --help)");
    else args.positional.push_back(arg);
    for (const char* flag : {"--prompt", "--device", "--max-tokens", "--temperature", "--top-p", "--seed", "--no-cache"})
      if (arg == flag) args.generate_flags.push_back(arg);
  }
  return args;
}

// Where plain `pithtrain` looks for its default config, in order: the installed layout beside the binary
// (<prefix>/bin/pithtrain reads <prefix>/share/pithtrain/configs/tiny.toml), then the source tree this
// binary was built from. The file is read at run time, so editing it needs no rebuild.
std::vector<std::filesystem::path> default_config_candidates() {
  std::vector<std::filesystem::path> candidates;
  std::error_code error;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", error);
  if (!error) candidates.push_back(exe.parent_path().parent_path() / "share" / "pithtrain" / "configs" / "tiny.toml");
  candidates.push_back(std::filesystem::path(PITHTRAIN_SOURCE_DIR) / "configs" / "tiny.toml");
  return candidates;
}

// The default config file, or "" when none of the candidates exists.
std::string find_default_config() {
  for (const auto& candidate : default_config_candidates())
    if (std::filesystem::is_regular_file(candidate)) return candidate.string();
  return "";
}

std::string default_config_places() {
  std::string places;
  for (const auto& candidate : default_config_candidates()) places += (places.empty() ? "" : ", ") + candidate.string();
  return places;
}

// The help text's last line: the file plain `pithtrain` would read.
std::string default_config_help() {
  const std::string found = find_default_config();
  return found.empty() ? "Default config: none found (looked in " + default_config_places() + "); pass --config FILE.\n"
                       : "Default config (without --config): " + found + "\n";
}

// `required`: without any config file the command cannot run; `pithtrain plugins` only reads plugins.paths
// from it and lists the plugins without one.
Options load_config(const Arguments& args, bool required = true) {
  std::string path = args.config;
  if (path.empty()) {
    path = find_default_config();
    if (path.empty() && required)
      throw Error("no --config given and no default config found (looked in " + default_config_places() +
                  "); pass --config FILE, or install pithtrain with its configs (cmake --install)");
  }
  Options options = path.empty() ? Options::from_string("", "(no config file)") : Options::from_file(path);
  for (const auto& assignment : args.sets) options.set_override(assignment);
  return options;
}

int command_plugins(const Arguments& args) {
  if (args.help) return std::cout << kPluginsHelp << default_config_help(), 0;
  Options options = load_config(args, /*required=*/false);
  PluginRegistry registry(default_search_dirs(options.table("plugins").text_list("paths", {})), args.plugins);
  auto plugins = registry.load_all();
  if (args.json) {
    std::cout << "[";
    for (size_t i = 0; i < plugins.size(); ++i) {
      const auto* d = plugins[i]->descriptor;
      std::cout << (i ? "," : "") << "\n  {\"kind\":" << json_quote(d->kind) << ",\"name\":" << json_quote(d->name)
                << ",\"version\":" << json_quote(d->version) << ",\"file\":" << json_quote(plugins[i]->file.string())
                << ",\"description\":" << json_quote(d->description) << "}";
    }
    std::cout << "\n]\n";
    return 0;
  }
  std::cout << "search path:";
  for (const auto& dir : registry.search_dirs()) std::cout << " " << dir.string();
  std::cout << "\n";
  for (const auto* plugin : plugins) {
    const auto* d = plugin->descriptor;
    std::printf("%-10s %-14s v%-7s %s\n           %s\n", d->kind, d->name, d->version, plugin->file.c_str(), d->description);
  }
  return 0;
}

int command_plugin_check(const Arguments& args) {
  if (args.help || args.positional.size() != 2 || args.positional[0] != "check")
    return std::cout << kCheckHelp, args.help ? 0 : 2;
  LoadedPlugin plugin = load_plugin_file(args.positional[1]);
  std::cout << "checking " << plugin.kind() << " plugin '" << plugin.name() << "' v" << plugin.descriptor->version
            << " (" << plugin.file.string() << ")\n";
  int failed = 0;
  auto results = run_conformance(*plugin.descriptor);
  for (const auto& result : results) {
    std::cout << (result.passed ? "  PASS  " : "  FAIL  ") << result.name << ": " << result.detail << "\n";
    failed += !result.passed;
  }
  std::cout << results.size() - failed << " passed, " << failed << " failed\n";
  return failed == 0 ? 0 : 1;
}

int command_data(const Arguments& args) {
  if (args.help) return std::cout << kDataHelp, 0;
  if (args.positional.empty() || args.positional[0] != "build") return std::cout << kDataHelp, 2;
  std::vector<std::string> inputs(args.positional.begin() + 1, args.positional.end());
  if (args.out.empty() || inputs.empty()) throw Error("data build: needs --out FILE and at least one INPUT (see --help)");
  const std::string kind = args.tokenizer.empty() ? "bytes" : args.tokenizer;
  TokenizerSpec tokenizer{kind, args.tokenizer_model, args.train_vocab};
  ConvertStats stats = convert_text(inputs, args.format, args.out, tokenizer, /*progress=*/true);
  std::cout << "wrote " << args.out << ": " << stats.tokens << " tokens, " << stats.documents << " documents from "
            << stats.files << " files (" << kind << ", vocab " << stats.vocab_size << ")";
  if (!stats.tokenizer_model.empty()) std::cout << "; tokenizer model " << stats.tokenizer_model;
  std::cout << "\n";
  return 0;
}

const char* kEvalHelp = R"(usage: pithtrain eval --run RUN_DIR [--data FILE] [--split validation|all] [--weights FILE] [--json] [--set KEY=VALUE]...
Scores a run's saved weights on a token file: mean cross-entropy per token (loss), perplexity (e^loss)
and bits per byte (byte-level token files), in one process, with the run's own config.toml.
  --run RUN_DIR      the training run (its --out folder): config.toml, model.safetensors or checkpoints/
  --data FILE        a token file built with the run's tokenizer (default: the run's data.path)
  --split S          validation: the held-out windows the run's validation loss uses (the default without
                     --data; on the run's own data it prints the run's last validation loss); all: every
                     window of train.seq_len + 1 tokens at a stride of seq_len over the whole file (the
                     default with --data)
  --weights FILE     a model.safetensors or checkpoint (default: RUN_DIR/model.safetensors, else the newest
                     checkpoint)
  --json             one JSON object: loss, perplexity, bits_per_byte, windows, targets, bytes, ...
  --set KEY=VALUE    override a key of the run's config, e.g. --set train.device=cpu
  --plugins LIST     plugin files the run was given with --plugins (out-of-tree plugins)
)";

int command_eval(const Arguments& args) {
  if (args.help) return std::cout << kEvalHelp, 0;
  if (!args.positional.empty()) throw Error("eval: unexpected argument '" + args.positional[0] + "' (see pithtrain eval --help)");
  const EvalReport report = evaluate_run({args.run, args.data, args.weights, args.split, args.sets, args.plugins});
  const std::string bits = std::isnan(report.bits_per_byte) ? "null" : fmt::format("{:.17g}", report.bits_per_byte);
  if (args.json) {
    std::cout << "{\"loss\":" << fmt::format("{:.17g}", report.loss) << ",\"perplexity\":" << fmt::format("{:.17g}", report.perplexity)
              << ",\"bits_per_byte\":" << bits << ",\"windows\":" << report.windows << ",\"targets\":" << report.targets
              << ",\"bytes\":" << report.bytes << ",\"seq_len\":" << report.seq_len << ",\"split\":" << json_quote(report.split)
              << ",\"data\":" << json_quote(report.data) << ",\"weights\":" << json_quote(report.weights) << ",\"step\":" << report.step
              << "}\n";
    return 0;
  }
  std::cout << "weights " << report.weights << (report.step >= 0 ? " (step " + std::to_string(report.step) + ")" : "") << ", data "
            << report.data << ", "
            << (report.split == "validation" ? "the run's validation windows" : "every window of the file") << ": " << report.windows
            << " windows of " << report.seq_len << " targets\n";
  // The loss to 6 significant digits, as metrics.jsonl writes val_loss.
  std::cout << fmt::format("loss {:.6g} | perplexity {:.4g} | bits per byte {}\n", report.loss, report.perplexity,
                           std::isnan(report.bits_per_byte) ? std::string("n/a (not a byte-level token file)")
                                                            : fmt::format("{:.4f}", report.bits_per_byte));
  return 0;
}

const char* kGenerateHelp = R"(usage: pithtrain generate --run RUN_DIR --prompt TEXT [--max-tokens N] [--temperature T] [--top-p P] [--seed S] [--json]
       pithtrain generate --config FILE --weights FILE --prompt TEXT [...]
Continues TEXT with a run's model, in one process. The prompt, read as the start of a document, goes
through the model once; then each new token is drawn from the model's next-token distribution and fed
back through every attention layer's key/value cache (an attention plugin without a cache path
recomputes the whole prefix for each token instead, and generate says so). It stops after --max-tokens
or at the end-of-document token. The text goes to stdout as it comes; the speed and what was loaded go
to stderr.
  --run RUN_DIR      the training run (its --out folder): config.toml, and model.safetensors or the newest checkpoint
  --config FILE      a config instead of a run (a run's config.toml, or one from `convert import`), with --weights
  --weights FILE     a model.safetensors or checkpoint (with --run, default: RUN_DIR/model.safetensors, else the
                     newest checkpoint)
  --prompt TEXT      the text to continue ('' starts a document from nothing)
  --max-tokens N     new tokens at most, N >= 1 (default 128; a byte-level token is one byte)
  --temperature T    0: greedy, the most likely token each time, deterministic; T > 0: a draw from
                     softmax(logits / T), lower is more conservative (default 1: the model's own distribution)
  --top-p P          nucleus sampling: draw only among the most likely tokens whose probabilities reach P
                     together, 0 < P <= 1 (default 1: every token)
  --seed S           the sampler's seed, S >= 0 (default 0): the same command gives the same text
  --tokenizer T      bytes, or a SentencePiece .model file (default: the tokenizer the run's token file,
                     data.path, names; a SentencePiece model is looked for at DATA_PATH.model, where data build
                     writes it)
  --device D         cpu, cuda or cuda:N (default: the run's train.device)
  --no-cache         recompute the whole prefix for every token instead of using the caches (to check or time them)
  --json             one JSON object: text, tokens, prompt_tokens, stop, cached, tokens_per_second, notes, ...
  --set KEY=VALUE    override a key of the config, e.g. --set train.dtype=float32
  --plugins LIST     plugin files the run was given with --plugins (out-of-tree plugins)
)";

int command_generate(const Arguments& args) {
  if (args.help) return std::cout << kGenerateHelp, 0;
  if (!args.positional.empty())
    throw Error("generate: unexpected argument '" + args.positional[0] + "' (a prompt goes after --prompt; see pithtrain generate --help)");
  GenerateRequest request;
  request.run_dir = args.run, request.config = args.config, request.weights = args.weights, request.tokenizer = args.tokenizer;
  request.device = args.device, request.prompt = args.prompt, request.has_prompt = args.has_prompt;
  request.sampling = args.sampling, request.sets = args.sets, request.plugins = args.plugins;
  g_device = args.device.empty() ? g_device : args.device;
  std::vector<std::string> notes;
  auto note = [&](const std::string& text) {
    notes.push_back(text);
    std::cerr << "note: " << text << std::endl;
  };
  auto text = [&](const std::string& piece) {
    if (!args.json) std::cout << piece << std::flush;
  };
  const GenerateReport report = generate_text(request, note, text);
  const Generation& generation = report.generation;
  g_device = report.device;
  const double per_second = generation.seconds > 0 ? static_cast<double>(generation.tokens.size()) / generation.seconds : 0;
  if (args.json) {
    auto ids = [](const std::vector<int64_t>& tokens) {
      std::string list = "[";
      for (size_t i = 0; i < tokens.size(); ++i) list += (i ? "," : "") + std::to_string(tokens[i]);
      return list + "]";
    };
    std::string note_list = "[";
    for (size_t i = 0; i < notes.size(); ++i) note_list += (i ? "," : "") + json_quote(notes[i]);
    std::cout << "{\"text\":" << json_quote(valid_utf8(report.text)) << ",\"prompt\":" << json_quote(valid_utf8(args.prompt))
              << ",\"tokens\":" << ids(generation.tokens) << ",\"prompt_tokens\":" << ids(report.prompt_tokens)
              << ",\"stop\":" << json_quote(generation.stopped ? "end_of_document" : "max_tokens")
              << ",\"cached\":" << (generation.cached ? "true" : "false") << ",\"attention\":" << json_quote(report.attention)
              << ",\"tokens_per_second\":" << fmt::format("{:.6g}", per_second) << ",\"seconds\":" << fmt::format("{:.6g}", generation.seconds)
              << ",\"prompt_seconds\":" << fmt::format("{:.6g}", generation.prompt_seconds) << ",\"weights\":" << json_quote(report.weights)
              << ",\"step\":" << report.step << ",\"tokenizer\":" << json_quote(report.tokenizer) << ",\"device\":" << json_quote(report.device)
              << ",\"dtype\":" << json_quote(report.dtype) << ",\"notes\":" << note_list << "]}\n";
    return 0;
  }
  std::cout << "\n" << std::flush;
  std::cerr << fmt::format("{} tokens in {:.3g} s: {:.4g} tokens/s ({}; the prompt, {} tokens, took {:.3g} s), {}\n", generation.tokens.size(),
                           generation.seconds, per_second, generation.cached ? "with the attention caches" : "recomputing the prefix",
                           report.prompt_tokens.size(), generation.prompt_seconds,
                           generation.stopped ? "ended at the end of document" : "ended at --max-tokens")
            << "weights " << report.weights << (report.step >= 0 ? " (step " + std::to_string(report.step) + ")" : "") << ", tokenizer "
            << report.tokenizer << ", " << report.device << " " << report.dtype << ", attention " << report.attention << "\n";
  return 0;
}

const char* kPlotHelp = R"(usage: pithtrain plot RUN_DIR
Writes PNG charts of RUN_DIR/metrics.jsonl into RUN_DIR with gnuplot: loss.png (train and validation),
lr.png, throughput.png (tokens/s and MFU), router_load.png (max/mean expert load per MoE layer) and
expert_load.png (a heat map per MoE layer: each expert's share of the tokens at each logged step).
)";

int command_plot(const Arguments& args) {
  if (args.help || args.positional.size() != 1) return std::cout << kPlotHelp, args.help ? 0 : 2;
  for (const auto& file : plot_run(args.positional[0])) std::cout << "wrote " << file << "\n";
  return 0;
}

const char* kExplainHelp = R"(usage: pithtrain explain [--config FILE] [--run RUN_DIR] [--set dotted.key=value]... [--plugins A.so,...]
Prints the model report for a config: total and active parameters (per component), FLOPs per token
(forward and training) and an estimate of training memory per device for train.batch_size,
train.seq_len and train.dtype. The model is built on the meta device, so any size works.
  --run RUN_DIR   a run of this model: its config.toml (unless --config is given) and, for a router with a
                  varying number of experts per token, the mean active experts its metrics.jsonl measured
)";

int command_explain(const Arguments& args) {
  if (args.help) return std::cout << kExplainHelp << default_config_help(), 0;
  if (args.run.empty()) return std::cout << format_report(explain_model(load_config(args), args.plugins)), 0;
  Arguments with_config = args;
  if (with_config.config.empty()) with_config.config = (std::filesystem::path(args.run) / "config.toml").string();
  const double measured = measured_active_experts((std::filesystem::path(args.run) / "metrics.jsonl").string());
  std::cout << format_report(explain_model(load_config(with_config), args.plugins, measured));
  return 0;
}

const char* kConvertHelp = R"(usage: pithtrain convert import HF_DIR --out DIR
       pithtrain convert export --config DIR/config.toml --weights DIR/model.safetensors --out HF_DIR
import: a Hugging Face model folder (config.json, model.safetensors or shards with their index) becomes
        DIR/config.toml and DIR/model.safetensors; train from it with --config DIR/config.toml
        --init-from DIR/model.safetensors.
export: PithTrain weights (a model.safetensors or a checkpoint) become config.json + model.safetensors.
Architectures: qwen3_moe, mixtral, olmoe, deepseek_v2, deepseek_v3, gpt_oss, qwen3_next, qwen3_5_moe_text
(docs/models.md). The round trip is bit-exact.
)";

int command_convert(const Arguments& args) {
  if (args.help || args.positional.empty()) return std::cout << kConvertHelp, args.help ? 0 : 2;
  if (args.out.empty()) throw Error("convert: needs --out DIR (see --help)");
  if (args.positional[0] == "import" && args.positional.size() == 2) {
    import_hf(args.positional[1], args.out);
    std::cout << "wrote " << args.out << "/config.toml and " << args.out << "/model.safetensors\n";
    return 0;
  }
  if (args.positional[0] == "export" && args.positional.size() == 1) {
    if (args.config.empty() || args.weights.empty()) throw Error("convert export: needs --config and --weights (see --help)");
    export_hf(args.config, args.weights, args.out);
    std::cout << "wrote " << args.out << "/config.json and " << args.out << "/model.safetensors\n";
    return 0;
  }
  return std::cout << kConvertHelp, 2;
}

const char* kLaunchHelp = R"(usage: pithtrain launch --nproc N [--nnodes M --node-rank R --master ADDR:PORT] [--] [training arguments...]
Starts N local training processes of this pithtrain with the rank environment (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and the same arguments: data (and expert) parallel over c10d process
groups, Gloo on CPUs, NCCL with train.device = "cuda" (docs/distributed.md). Each process takes
train.batch_size sequences of the global batch; rank 0 prints progress and writes the run directory,
ranks 1.. keep their logs in RUN_DIR/rank_N. If one process fails, the others are stopped and the exit
status is non-zero, naming the rank. torchrun and SLURM can start the same processes instead
(RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS).
  --nproc N            processes on this machine
  --nnodes M           machines in the job (default 1); run the same command on each
  --node-rank R        this machine's place, 0..M-1; its processes are ranks R*N .. R*N+N-1
  --master ADDR:PORT   rank 0's machine and a free port there (needed with --nnodes > 1; default
                       127.0.0.1 and a free port). Gloo uses GLOO_SOCKET_IFNAME as its interface if set
)";

int command_launch(int argc, char** argv) {
  LaunchPlan plan;
  plan.processes = 0;
  std::vector<std::string> rest;
  auto integer = [](const std::string& flag, const std::string& value) { return integer_argument("launch: " + flag, value); };
  for (int i = 2; i < argc; ++i) {
    std::string arg = argv[i];
    const bool has_value = rest.empty() && i + 1 < argc;
    if (rest.empty() && (arg == "--help" || arg == "-h")) return std::cout << kLaunchHelp, 0;
    if (has_value && arg == "--nproc") plan.processes = integer(arg, argv[++i]);
    else if (has_value && arg == "--nnodes") plan.nodes = integer(arg, argv[++i]);
    else if (has_value && arg == "--node-rank") plan.node_rank = integer(arg, argv[++i]);
    else if (has_value && arg == "--master") {
      const std::string value = argv[++i];
      const auto colon = value.rfind(':');
      if (colon == std::string::npos || colon == 0)
        throw Error("launch: --master takes ADDR:PORT (rank 0's machine and a free port), got '" + value + "'");
      plan.master_address = value.substr(0, colon);
      plan.master_port = static_cast<int>(integer("--master", value.substr(colon + 1)));
    } else if (rest.empty() && arg == "--") continue;
    else rest.push_back(arg);
  }
  if (plan.processes < 1) throw Error("launch: needs --nproc N (see pithtrain launch --help)");
  return launch(plan, rest);
}

int command_train(const Arguments& args) {
  if (args.help) return std::cout << kTrainHelp << default_config_help(), 0;
  if (!args.positional.empty()) throw Error("unexpected argument '" + args.positional[0] + "' (see --help)");
  if (!args.generate_flags.empty()) {  // `pithtrain --device cuda` would otherwise train on train.device, silently
    const std::string& flag = args.generate_flags.front();
    const std::string key = flag == "--device" ? "train.device" : flag == "--seed" ? "train.seed" : "";
    throw Error(flag + " is a flag of `pithtrain generate`" +
                (key.empty() ? std::string(" (see pithtrain generate --help)") : "; for training set " + key + " (--set " + key + "=...)"));
  }
  RunSettings settings;
  settings.plugin_files = args.plugins;
  settings.out_dir = args.out;
  settings.trace_routing = args.trace_routing;
  settings.profile = args.profile;
  settings.init_from = args.init_from;
  settings.move_aside = args.move_aside;
  Trainer trainer(load_config(args), settings);
  g_device = trainer.config().device;
  trainer.run();
  return 0;
}

// ATE-Bench's active-compute ledger (docs/ate-bench.md): when PITHTRAIN_ATE_LEDGER names a file, every
// pithtrain process appends one JSON line with its command, device, wall seconds and exit status.
void append_to_ledger(int argc, char** argv, double seconds, int exit_code) {
  const char* path = std::getenv("PITHTRAIN_ATE_LEDGER");
  if (path == nullptr || *path == '\0') return;
  if (argc > 1 && std::string(argv[1]) == "launch") return;  // its processes write their own lines
  std::string command;
  for (int i = 0; i < argc; ++i) command += (i ? " " : "") + std::string(argv[i]);
  std::ofstream ledger(path, std::ios::app);
  ledger << "{\"tool\":\"pithtrain\",\"pid\":" << getpid() << ",\"command\":" << json_quote(command)
         << ",\"device\":" << json_quote(g_device) << ",\"wall_seconds\":" << seconds << ",\"exit_code\":" << exit_code
         << ",\"end_unix\":" << std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count()
         << "}\n";
}

// Every failure ends as one line on stderr, the last one, and exit status 1: a message with line breaks
// (a library's multi-line text) is joined with " | ".
int report_error(std::string message) {
  while (!message.empty() && std::isspace(static_cast<unsigned char>(message.back()))) message.pop_back();
  std::string line;
  for (size_t start = 0; start <= message.size();) {
    size_t end = message.find('\n', start);
    if (end == std::string::npos) end = message.size();
    std::string piece = message.substr(start, end - start);
    if (!piece.empty() && piece.back() == '\r') piece.pop_back();
    if (piece.find_first_not_of(" \t") != std::string::npos) line += (line.empty() ? "" : " | ") + piece;
    start = end + 1;
  }
  std::cout.flush();
  std::cerr << "pithtrain: error: " << (line.empty() ? "(no message)" : line) << std::endl;
  return 1;
}

int run_command(int argc, char** argv) {
  try {
    std::string command = argc > 1 ? argv[1] : "";
    if (command == "plugins") return command_plugins(parse(argc, argv, 2));
    if (command == "plugin") return command_plugin_check(parse(argc, argv, 2));
    if (command == "data") return command_data(parse(argc, argv, 2));
    if (command == "eval") return command_eval(parse(argc, argv, 2));
    if (command == "generate") return command_generate(parse(argc, argv, 2));
    if (command == "plot") return command_plot(parse(argc, argv, 2));
    if (command == "explain") return command_explain(parse(argc, argv, 2));
    if (command == "convert") return command_convert(parse(argc, argv, 2));
    if (command == "launch") return command_launch(argc, argv);
    if (!command.empty() && command[0] != '-')
      throw Error("unknown command '" + command +
                  "'; commands: plugins, plugin check, data build, eval, generate, plot, explain, convert, launch (or none, to train)");
    return command_train(parse(argc, argv, 1));
  } catch (const c10::Error& error) {  // LibTorch's what() carries a C++ backtrace: the message alone
    return report_error(error.what_without_backtrace());
  } catch (const std::exception& error) {
    return report_error(error.what());
  } catch (...) {
    return report_error("an unknown exception (not a std::exception) was thrown; please report it with the command line");
  }
}

}  // namespace

int main(int argc, char** argv) {
  const auto start = std::chrono::steady_clock::now();
  const int exit_code = run_command(argc, argv);
  append_to_ledger(argc, argv, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), exit_code);
  return exit_code;
}
