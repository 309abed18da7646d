#!/usr/bin/env python3
"""ctest `generate_command`: `pithtrain generate` on runs it trains itself. A tiny model trained on many
copies of one sentence (tests/configs/generate_memorise.toml) recites it greedily from its first word,
stops at the end of the document, and gives the same tokens with and without the attention caches, from
the run directory, from --config with --weights and from a checkpoint; sampling repeats under a seed.
An attention plugin without a cache path still generates and says so once. SentencePiece runs use the
model data build wrote beside their tokens. Bad input exits non-zero with one line naming the flag or file.

Args: PITHTRAIN_BIN SOURCE_DIR TEST_PLUGIN_DIR FORTUNES_DIR."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

binary, source, test_plugins, fortunes = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
SENTENCE = "PithTrain recites this line: a small MoE learnt it by heart."
failures = []


def check(condition, message):
    if not condition:
        failures.append(message)
        print("FAIL:", message)


# One intra-op thread: these models are tiny, and on a busy 2-core machine a second thread mostly waits.
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1"}


def pithtrain(*args, expect_ok=True):
    result = subprocess.run([binary, *map(str, args)], capture_output=True, env=ENVIRONMENT)
    result.stdout, result.stderr = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    if expect_ok and result.returncode != 0:
        sys.exit(f"FAIL: pithtrain {' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def generate(*args):
    return json.loads(pithtrain("generate", "--json", *args).stdout)


with tempfile.TemporaryDirectory() as scratch:
    work = Path(scratch)
    corpus = work / "memorise.jsonl"
    corpus.write_text("".join(json.dumps({"text": SENTENCE}) + "\n" for _ in range(300)))
    tokens = work / "memorise.tokens"
    pithtrain("data", "build", "--out", tokens, corpus)
    run = work / "run"
    trained = pithtrain("--config", source / "tests/configs/generate_memorise.toml", "--set", f"data.path={tokens}", "--out", run)
    print(trained.stdout.strip().splitlines()[-1])

    # Greedy from the first word: the rest of the sentence, then the end of the document.
    prompt = "PithTrain"
    greedy = generate("--run", run, "--prompt", prompt, "--temperature", "0", "--max-tokens", "200")
    print("greedy:", {key: greedy[key] for key in ("text", "stop", "cached", "tokens_per_second", "step")})
    check(greedy["text"] == SENTENCE[len(prompt):], f"the memorised sentence was not recited: {greedy['text']!r}")
    check(greedy["stop"] == "end_of_document" and greedy["tokens"][-1] == 256 and len(greedy["tokens"]) == len(SENTENCE) - len(prompt) + 1,
          f"it did not stop right after the sentence: stop {greedy['stop']}, {len(greedy['tokens'])} tokens")
    check(greedy["prompt_tokens"] == [256] + list(prompt.encode()), f"the prompt is not fed after an end of document: {greedy['prompt_tokens']}")
    check(greedy["cached"] and greedy["attention"] == "gqa" and greedy["notes"] == [] and greedy["step"] == 120,
          f"not the cached gqa path on the final weights: {greedy}")

    # Without the caches: the same tokens, and one note saying why it is slower.
    uncached = pithtrain("generate", "--json", "--run", run, "--prompt", prompt, "--temperature", "0", "--max-tokens", "200", "--no-cache")
    report = json.loads(uncached.stdout)
    check(report["tokens"] == greedy["tokens"] and not report["cached"], "--no-cache gives other tokens, or says it used the caches")
    check(uncached.stderr.count("recomputes the whole prefix") == 1, f"--no-cache is not noted once: {uncached.stderr!r}")

    # For people: the prompt and its continuation on stdout, the speed on stderr.
    human = pithtrain("generate", "--run", run, "--prompt", prompt, "--temperature", "0")
    check(human.stdout == SENTENCE + "\n", f"stdout is not the sentence: {human.stdout!r}")
    check("tokens/s" in human.stderr and "with the attention caches" in human.stderr and "ended at the end of document" in human.stderr,
          f"stderr lacks the summary: {human.stderr!r}")

    # --max-tokens cuts it short; --config with --weights and the checkpoint (model/ names) give the same tokens.
    short = generate("--run", run, "--prompt", prompt, "--temperature", "0", "--max-tokens", "7")
    check(short["text"] == SENTENCE[len(prompt):len(prompt) + 7] and short["stop"] == "max_tokens", f"--max-tokens 7: {short['text']!r}")
    apart = generate("--config", run / "config.toml", "--weights", run / "model.safetensors", "--prompt", prompt, "--temperature", "0")
    check(apart["tokens"] == greedy["tokens"], "--config with --weights differs from --run")
    checkpoint = run / "checkpoints" / "step_000000120.safetensors"
    from_checkpoint = generate("--run", run, "--weights", checkpoint, "--prompt", prompt, "--temperature", "0")
    check(from_checkpoint["tokens"] == greedy["tokens"] and from_checkpoint["step"] == 120, "the step-120 checkpoint differs from model.safetensors")

    # An empty prompt starts a document: the memorised sentence, whole.
    empty = generate("--run", run, "--prompt", "", "--temperature", "0")
    check(empty["text"] == SENTENCE and empty["prompt_tokens"] == [256], f"from an empty prompt: {empty['text']!r}")

    # An attention plugin without a cache path: generation works, recomputing, and says so once.
    plugin = test_plugins / "attention_uncached.so"
    plain = work / "plain"
    pithtrain("--config", source / "tests/configs/generate_memorise.toml", "--set", f"data.path={tokens}", "--set", "train.steps=2",
              "--set", "checkpoint.every=0", "--set", "model.attention.plugin=uncached", "--plugins", plugin, "--out", plain)
    fallback = pithtrain("generate", "--json", "--run", plain, "--plugins", plugin, "--prompt", prompt, "--max-tokens", "20")
    report = json.loads(fallback.stdout)
    check(not report["cached"] and len(report["tokens"]) <= 20 and report["attention"] == "uncached",
          f"the uncached plugin: {report}")
    check(fallback.stderr.count("has no cache path") == 1 and len(report["notes"]) == 1 and "'uncached'" in report["notes"][0],
          f"the fallback is not noted once: {fallback.stderr!r}")

    # SentencePiece: data build keeps its model at TOKENS.model, where generate finds it.
    sp_tokens = work / "sp.tokens"
    pithtrain("data", "build", "--format", "fortune", "--tokenizer", "sentencepiece", "--train-vocab", "400", "--out", sp_tokens,
              fortunes / "literature")
    sp_run = work / "sp_run"
    pithtrain("--config", source / "tests/configs/generate_memorise.toml", "--set", f"data.path={sp_tokens}", "--set", "model.vocab_size=400",
              "--set", "train.steps=30", "--set", "checkpoint.every=0", "--out", sp_run)
    sp = generate("--run", sp_run, "--prompt", "The man", "--max-tokens", "30", "--seed", "1")
    print("sentencepiece:", {key: sp[key] for key in ("text", "tokenizer", "stop")})
    check(sp["tokenizer"] == f"sentencepiece {sp_tokens}.model" and len(sp["prompt_tokens"]) >= 2 and sp["text"] != "",
          f"not the run's SentencePiece model, or no text: {sp}")
    check(all(0 <= token < 400 for token in sp["tokens"]) and (sp["stop"] == "max_tokens") == (len(sp["tokens"]) == 30),
          f"SentencePiece tokens out of range or a wrong stop: {sp}")
    explicit = generate("--run", sp_run, "--tokenizer", f"{sp_tokens}.model", "--prompt", "The man", "--max-tokens", "30", "--seed", "1")
    check(explicit["tokens"] == sp["tokens"], "--tokenizer naming the same model gives other tokens")

    # Sampling (from the barely trained SentencePiece model, whose next tokens are uncertain): a seed
    # repeats its tokens, with and without the caches; other seeds draw other tokens.
    hot = ["--run", sp_run, "--prompt", "The man", "--temperature", "1.2", "--top-p", "0.95", "--max-tokens", "40"]
    first = generate(*hot, "--seed", "2")
    check(generate(*hot, "--seed", "2")["tokens"] == first["tokens"] and generate(*hot, "--seed", "2", "--no-cache")["tokens"] == first["tokens"],
          "the same seed drew different tokens")
    others = [generate(*hot, "--seed", str(seed)) for seed in (4, 5)]
    seeds = {tuple(report["tokens"]) for report in [first, *others]}
    check(len(seeds) == 3, f"three seeds drew only {len(seeds)} different texts")

    # The text is SentencePiece's own decoding of the prompt's pieces and the new ones (spm_decode, the
    # Debian CLI), less the prompt: a first new piece keeps its leading space.
    for report in (sp, first, *others):
        pieces = report["prompt_tokens"][1:] + [token for token in report["tokens"] if token != report["prompt_tokens"][0]]
        decoded = subprocess.run(["spm_decode", f"--model={sp_tokens}.model", "--input_format=id"], input=" ".join(map(str, pieces)) + "\n",
                                 capture_output=True, text=True, check=True).stdout.rstrip("\n")
        check(decoded == "The man" + report["text"], f"the text is not the pieces' decoding: {decoded!r} vs 'The man' + {report['text']!r}")

    # Bad input: one line on stderr naming the flag or file and the fix, non-zero exit.
    Path(f"{sp_tokens}.model").rename(work / "moved.model")
    no_alphabet = work / "letters.model"  # a SentencePiece model without byte fallback: '#' is unknown to it
    (work / "letters.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    subprocess.run(["spm_train", f"--input={work / 'letters.txt'}", f"--model_prefix={work / 'letters'}", "--vocab_size=40",
                    "--model_type=bpe", "--hard_vocab_limit=false", "--minloglevel=2"], check=True, capture_output=True)
    wide = work / "wide.model"  # a vocabulary larger than the byte-level run's 257
    shutil.copy(work / "moved.model", wide)
    cases = [  # the cases that need these runs; tests/test_bad_input.py has the rest
        (["--run", run, "--prompt", "x", "--tokenizer", work / "nope.model"], ["--tokenizer", "nope.model", "no such file"]),
        (["--run", sp_run, "--prompt", "x"], [f"{sp_tokens}.model", "--tokenizer FILE.model"]),
        (["--run", run, "--prompt", "# x", "--tokenizer", no_alphabet], ["--prompt", "cannot encode", "<unk>"]),
        (["--run", run, "--prompt", "The man", "--tokenizer", wide], ["--prompt encodes to token", "vocabulary of 257", "--tokenizer"]),
        (["--config", sp_run / "config.toml", "--weights", run / "model.safetensors", "--prompt", "x", "--tokenizer", "bytes"],
         [str(run / "model.safetensors"), "shape", "config.toml of the run that wrote these weights"]),
    ]
    tokens.rename(work / "moved.tokens")  # the run's data.path gone: the tokenizer must be named
    cases.append((["--run", run, "--prompt", "x"], [str(tokens), "--tokenizer bytes"]))
    for args, words in cases:
        result = pithtrain("generate", *args, expect_ok=False)
        lines = result.stderr.strip().splitlines()
        check(result.returncode != 0 and lines and lines[-1].startswith("pithtrain: error:") and all(w in lines[-1] for w in words),
              f"generate {' '.join(map(str, args))}: expected an error naming {words}, got {result.returncode}: {result.stderr.strip()}")
        check(result.stdout == "", f"generate {' '.join(map(str, args))}: failed but printed {result.stdout!r} on stdout")
    # With the tokenizer named, the run still generates without its token file.
    named = generate("--run", run, "--prompt", prompt, "--temperature", "0", "--tokenizer", "bytes")
    check(named["tokens"] == greedy["tokens"], "--tokenizer bytes without the token file gives other tokens")

print(f"{0 if failures else 1} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
