// SentencePiece training, encoding and decoding (Debian's libsentencepiece).
#include "sentencepiece_tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include "pithtrain/error.h"

namespace pithtrain {

void train_sentencepiece(const std::string& corpus, const std::string& prefix, int64_t vocab_size) {
  const std::string arguments = "--input=" + corpus + " --model_prefix=" + prefix +
                                " --vocab_size=" + std::to_string(vocab_size) +
                                " --model_type=bpe --character_coverage=1.0 --byte_fallback=true"
                                " --input_sentence_size=2000000 --shuffle_input_sentence=true --minloglevel=2";
  auto status = sentencepiece::SentencePieceTrainer::Train(arguments);
  if (!status.ok())
    throw Error("training a SentencePiece model of vocabulary " + std::to_string(vocab_size) + " failed: " +
                status.ToString() + " (a smaller --train-vocab usually fixes a small corpus)");
}

struct SentencePieceEncoder::Impl {
  sentencepiece::SentencePieceProcessor processor;
};

SentencePieceEncoder::SentencePieceEncoder(const std::string& model) : impl_(std::make_unique<Impl>()) {
  auto status = impl_->processor.Load(model);
  if (!status.ok()) throw Error("SentencePiece model '" + model + "': " + status.ToString());
  if (impl_->processor.eos_id() < 0)
    throw Error("SentencePiece model '" + model + "' has no </s> (eos) piece to end documents with");
}

SentencePieceEncoder::~SentencePieceEncoder() = default;

void SentencePieceEncoder::encode(const std::string& text, std::vector<uint32_t>& out) const {
  std::vector<int> ids;
  auto status = impl_->processor.Encode(text, &ids);
  if (!status.ok()) throw Error("SentencePiece encoding failed: " + status.ToString());
  for (int id : ids) out.push_back(static_cast<uint32_t>(id));
}

uint32_t SentencePieceEncoder::end_of_document() const { return static_cast<uint32_t>(impl_->processor.eos_id()); }
uint64_t SentencePieceEncoder::vocab_size() const { return static_cast<uint64_t>(impl_->processor.GetPieceSize()); }

std::string SentencePieceEncoder::decode(const std::vector<uint32_t>& ids) const {
  std::vector<int> pieces(ids.begin(), ids.end());
  std::string text;
  auto status = impl_->processor.Decode(pieces, &text);
  if (!status.ok()) throw Error("SentencePiece decoding failed: " + status.ToString());
  return text;
}

int64_t SentencePieceEncoder::unknown() const { return impl_->processor.unk_id(); }

}  // namespace pithtrain
