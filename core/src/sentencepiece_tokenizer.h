// SentencePiece behind a small interface, so only one file of the core sees its headers.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace pithtrain {

// Trains a BPE model on `corpus` (one text per line) and writes PREFIX.model and PREFIX.vocab.
// Byte fallback is on, so any text encodes; throws Error with SentencePiece's message on failure.
void train_sentencepiece(const std::string& corpus, const std::string& prefix, int64_t vocab_size);

class SentencePieceEncoder {
 public:
  explicit SentencePieceEncoder(const std::string& model);  // throws Error naming the file
  ~SentencePieceEncoder();
  void encode(const std::string& text, std::vector<uint32_t>& out) const;  // appends ids
  uint32_t end_of_document() const;  // the model's </s> id
  uint64_t vocab_size() const;
  // For `pithtrain generate`: ids back to text, and the <unk> id (-1 when the model has none) that
  // marks text the model cannot encode.
  std::string decode(const std::vector<uint32_t>& ids) const;
  int64_t unknown() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace pithtrain
