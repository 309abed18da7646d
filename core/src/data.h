// The packed token format (docs/data.md): writing it from text, and reading random training windows
// from a memory-mapped file.
#pragma once
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace pithtrain {

// Byte-level tokenizer: tokens 0..255 are bytes, kEndOfDocument separates documents.
inline constexpr int64_t kByteVocabSize = 257;
inline constexpr uint16_t kEndOfDocument = 256;

struct TokenFileHeader {
  char magic[8];             // "PTTOKENS"
  uint32_t format_version;   // 1
  uint32_t bytes_per_token;  // 2 (uint16 little-endian)
  uint32_t vocab_size;       // every token is < vocab_size
  uint32_t tokenizer;        // 1 = bytes
  uint64_t num_tokens;
  uint64_t num_documents;
  uint64_t checksum;         // FNV-1a 64 over the token bytes
  uint8_t reserved[16];
};
static_assert(sizeof(TokenFileHeader) == 64);

struct ConvertStats {
  uint64_t files = 0;
  uint64_t documents = 0;
  uint64_t tokens = 0;
};

// Converts text files (or folders of them) to one token file. format "text": each file is a document;
// "fortune": documents are separated by lines holding only '%'. Writes to a temporary file and renames
// it over `output` only when complete, so a failure never leaves a partial file.
ConvertStats convert_text(const std::vector<std::string>& inputs, const std::string& format,
                          const std::string& output);

// A token file mapped read-only. Opening validates the header, size, token range and checksum, and
// throws Error naming the file and the fix on any mismatch.
class TokenDataset {
 public:
  explicit TokenDataset(const std::string& path);
  ~TokenDataset();
  TokenDataset(const TokenDataset&) = delete;
  TokenDataset& operator=(const TokenDataset&) = delete;

  uint64_t size() const { return header_.num_tokens; }
  const TokenFileHeader& header() const { return header_; }
  // `batch` windows of `length` tokens, starting at uniform offsets within [begin, end) of the token
  // stream: int64 [batch, length].
  at::Tensor sample(int64_t batch, int64_t length, uint64_t begin, uint64_t end, std::mt19937_64& generator) const;

 private:
  std::string path_;
  TokenFileHeader header_{};
  const uint16_t* tokens_ = nullptr;
  void* mapping_ = nullptr;
  size_t mapping_size_ = 0;
};

}  // namespace pithtrain
