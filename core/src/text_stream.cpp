// Streaming documents out of corpus files (text_stream.h): lines split across chunk boundaries, with the
// same documents as reading the whole file would give (lines as std::getline splits them).
#include "text_stream.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string_view>
#include <vector>

#include "json.h"
#include "pithtrain/error.h"

namespace pithtrain {
namespace fs = std::filesystem;

bool stream_documents(const fs::path& file, const std::string& format, const DocumentSink& sink,
                      const std::function<void(const InputFile&)>& on_chunk) {
  InputFile input(file);
  std::vector<char> chunk(1 << 20);
  std::string carry;  // a line begun in an earlier chunk
  uint64_t line_number = 0;
  auto handle_line = [&](std::string_view line) {
    ++line_number;
    if (format == "fortune") {
      if (line == "%") return sink.end();
      sink.append(line.data(), line.size());
      sink.append("\n", 1);
      return;
    }
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) return;  // jsonl: blank lines are allowed
    const std::string where = file.string() + ":" + std::to_string(line_number);
    const JsonValue record = parse_json(std::string(line), where);
    const JsonValue* text = record.find("text");
    if (text == nullptr || text->type != JsonValue::Type::String) throw Error(where + ": a .jsonl line needs a string field \"text\"");
    sink.append(text->text.data(), text->text.size());
    sink.end();
  };
  while (const size_t count = input.read(chunk.data(), chunk.size())) {
    if (std::memchr(chunk.data(), '\0', count) != nullptr) {
      // Not text, skipped; a compressed one is still read to its end, so damage is reported, never skipped.
      if (!compression_of(file).empty())
        while (input.read(chunk.data(), chunk.size()) > 0) {}
      return false;
    }
    on_chunk(input);
    if (format == "text") {
      sink.append(chunk.data(), count);
      continue;
    }
    size_t start = 0;
    while (const void* found = std::memchr(chunk.data() + start, '\n', count - start)) {
      const size_t end = static_cast<size_t>(static_cast<const char*>(found) - chunk.data());
      if (carry.empty()) {
        handle_line(std::string_view(chunk.data() + start, end - start));
      } else {
        carry.append(chunk.data() + start, end - start);
        handle_line(carry);
        carry.clear();
      }
      start = end + 1;
    }
    carry.append(chunk.data() + start, count - start);
  }
  if (!carry.empty()) handle_line(carry);  // a last line without its newline
  if (format != "jsonl") sink.end();        // the file's (text) or its last (fortune) document
  return true;
}

ByteProgress::ByteProgress(uint64_t total_bytes, std::string label, bool enabled)
    : total_(total_bytes), label_(std::move(label)), enabled_(enabled), start_(std::chrono::steady_clock::now()), last_(start_) {}

void ByteProgress::update(uint64_t done_bytes, const fs::path& file) {
  if (!enabled_) return;
  const auto now = std::chrono::steady_clock::now();
  if (now - last_ < std::chrono::seconds(2)) return;
  last_ = now;
  const double seconds = std::chrono::duration<double>(now - start_).count(), rate = done_bytes / std::max(seconds, 1e-9);
  const double left = total_ > done_bytes ? static_cast<double>(total_ - done_bytes) / std::max(rate, 1.0) : 0.0;
  std::fprintf(stderr, "[data] %s%.0f of %.0f MiB (%.0f%%), %.1f MiB/s, %.0f s left, %s\n", label_.c_str(), done_bytes / 1048576.0,
               total_ / 1048576.0, 100.0 * done_bytes / std::max<double>(static_cast<double>(total_), 1.0), rate / 1048576.0, left,
               file.c_str());
}

void ByteProgress::finish(uint64_t done_bytes) {
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  if (!enabled_ || seconds < 2) return;  // a quick build needs no summary
  std::fprintf(stderr, "[data] %sread %.1f MiB in %.1f s (%.1f MiB/s)\n", label_.c_str(), done_bytes / 1048576.0, seconds,
               done_bytes / 1048576.0 / std::max(seconds, 1e-9));
}

}  // namespace pithtrain
