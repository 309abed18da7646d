// Corpus files as they ship: plain, gzip (.gz, zlib) or zstd (.zst) compressed, read in chunks, so a file
// of any size streams through a fixed buffer (pithtrain data build).
#pragma once
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>

namespace pithtrain {

// "gzip" for *.gz, "zstd" for *.zst, "" for anything else (read as it is). Formats that need another
// step throw Error naming the file and that step: *.parquet (scripts/parquet_to_jsonl.py), *.xz, *.bz2.
std::string compression_of(const std::filesystem::path& file);
// The name without its compression suffix ("a.jsonl.zst" -> "a.jsonl"): what the content is.
std::filesystem::path without_compression(const std::filesystem::path& file);

class InputFile {
 public:
  explicit InputFile(const std::filesystem::path& path);  // throws Error naming the file when unreadable
  ~InputFile();
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;
  // Up to `capacity` bytes of the (decompressed) content; 0 only at its end. Corrupt or truncated
  // compressed data throws Error naming the file, the offset and the check that confirms it.
  size_t read(char* buffer, size_t capacity);
  // Bytes of the file on disk consumed so far (progress is measured in them).
  uint64_t disk_bytes_read() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace pithtrain
