// The documents of one corpus file (text, fortune or jsonl; plain, .gz or .zst), streamed in chunks: a
// document reaches the sink piece by piece, so no file is ever whole in memory; and the progress line.
#pragma once
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>

#include "compressed_input.h"

namespace pithtrain {

struct DocumentSink {
  std::function<void(const char*, size_t)> append;  // the next bytes of the current document
  std::function<void()> end;                         // the current document is complete (it may be blank)
};

// Streams the documents of `file` in `format` ("text": the file is one document; "fortune": documents
// end at lines holding only '%'; "jsonl": each line's "text" string) into `sink`, calling `on_chunk` after
// each chunk read. Returns false as soon as a NUL byte shows the file is not text: the caller drops what
// it got from it. Throws Error naming the file (and line, for jsonl) on bad content.
bool stream_documents(const std::filesystem::path& file, const std::string& format, const DocumentSink& sink,
                      const std::function<void(const InputFile&)>& on_chunk);

// A line every few seconds on stderr while a known number of bytes on disk is read: how far, how fast
// and how long is left.
class ByteProgress {
 public:
  ByteProgress(uint64_t total_bytes, std::string label, bool enabled);
  void update(uint64_t done_bytes, const std::filesystem::path& file);
  void finish(uint64_t done_bytes);

 private:
  uint64_t total_;
  std::string label_;
  bool enabled_;
  std::chrono::steady_clock::time_point start_, last_;
};

}  // namespace pithtrain
