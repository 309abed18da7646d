// The packed token format (docs/data.md): writing it from text, and reading random training windows
// from a memory-mapped file.
#pragma once
#include <cstdint>
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
  uint32_t bytes_per_token;  // 2 (uint16) or 4 (uint32), little-endian
  uint32_t vocab_size;       // every token is < vocab_size
  uint32_t tokenizer;        // 1 = bytes, 2 = SentencePiece, 3 = Hugging Face tokenizer.json
  uint64_t num_tokens;
  uint64_t num_documents;
  uint64_t checksum;         // CRC-32 (zlib) of the token bytes
  uint8_t reserved[16];
};
static_assert(sizeof(TokenFileHeader) == 64);

struct ConvertStats {
  uint64_t files = 0;
  uint64_t documents = 0;
  uint64_t tokens = 0;
  uint64_t vocab_size = 0;
  std::string tokenizer_model;  // the SentencePiece model used or trained, if any
};

// How text becomes tokens (docs/data.md). kind "bytes": byte-level, vocab 257. kind "sentencepiece":
// the model file `model`, or, when `train_vocab` > 0, a BPE model of that vocabulary trained on the
// corpus first and written to `model` (default: OUTPUT.model).
struct TokenizerSpec {
  std::string kind = "bytes";
  std::string model;
  int64_t train_vocab = 0;
};

// Converts text files (or folders of them) to one token file, an end-of-document token after each
// document. format "text": a file is a document; "fortune": documents are separated by lines holding
// only '%'; "jsonl": one JSON object per line, its "text" field a document; "auto": jsonl for *.jsonl
// files, text otherwise. *.gz and *.zst files are decompressed as they are read (a.jsonl.zst is jsonl).
// Streams: files in chunks, tokens to the file as they come (SentencePiece holds one document at a
// time). Writes to a temporary file and renames it over `output` only when complete, so a failure never
// leaves a partial file. `progress` prints a line every 2 s: bytes read, rate, time left.
ConvertStats convert_text(const std::vector<std::string>& inputs, const std::string& format,
                          const std::string& output, const TokenizerSpec& tokenizer = {}, bool progress = false);

// Writes a token file (header and tokens; 2 bytes per token when vocab_size <= 65536, else 4).
void write_token_file(const std::string& output, const std::vector<uint32_t>& tokens, uint64_t vocab_size,
                      uint32_t tokenizer_id, uint64_t documents);

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
  const std::string& path() const { return path_; }
  uint64_t token(uint64_t index) const;
  // The windows of `length` tokens starting at `offsets`: int64 [offsets.size(), length].
  at::Tensor windows(const std::vector<uint64_t>& offsets, int64_t length) const;

 private:
  std::string path_;
  TokenFileHeader header_{};
  const unsigned char* tokens_ = nullptr;
  void* mapping_ = nullptr;
  size_t mapping_size_ = 0;
};

// Fixed-length windows of a token range served in a seeded shuffled order, epoch after epoch. Window
// i covers tokens [begin + i * stride, begin + i * stride + length) with stride = length - 1, so every
// token is a target exactly once per epoch. The order of epoch e is a Fisher-Yates shuffle drawn from
// mt19937_64(seed + e); `position` (windows served so far) is all a resumed run needs.
class WindowOrder {
 public:
  WindowOrder(uint64_t begin, uint64_t end, int64_t length, uint64_t seed);
  uint64_t count() const { return count_; }
  uint64_t position() const { return position_; }
  void set_position(uint64_t position) { position_ = position; }
  // The start offset of the next window; advances the position.
  uint64_t next();

 private:
  uint64_t begin_, count_, stride_, seed_, position_ = 0;
  uint64_t cached_epoch_ = UINT64_MAX;
  std::vector<uint32_t> order_;
};

}  // namespace pithtrain
