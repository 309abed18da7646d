// Token files: text (plain or compressed, streamed) -> packed tokens written as they come, and
// validated memory-mapped reading.
#include "data.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>
#include <fstream>
#include <memory>
#include <sstream>

#include <ATen/ATen.h>
#include <zlib.h>

#include "json.h"
#include "pithtrain/error.h"
#include "sentencepiece_tokenizer.h"
#include "text_stream.h"

namespace pithtrain {
namespace fs = std::filesystem;

namespace {

// CRC-32 (IEEE 802.3) as zlib computes it, so tools in other languages can write token files cheaply.
uint64_t crc32(const uint8_t* bytes, size_t count, uint64_t crc = 0) {
  for (size_t done = 0; done < count;) {  // zlib takes 32-bit lengths
    const size_t piece = std::min<size_t>(count - done, 1u << 30);
    crc = ::crc32(static_cast<uLong>(crc), bytes + done, static_cast<uInt>(piece));
    done += piece;
  }
  return crc;
}

std::vector<fs::path> list_inputs(const std::vector<std::string>& inputs) {
  std::vector<fs::path> files;
  for (const auto& input : inputs) {
    if (fs::is_directory(input)) {
      std::vector<fs::path> found;
      for (const auto& entry : fs::recursive_directory_iterator(input)) {
        // Skip symlinks (fortune's *.u8 aliases) and index files (*.dat).
        if (entry.is_symlink() || !entry.is_regular_file() || entry.path().extension() == ".dat") continue;
        found.push_back(entry.path());
      }
      std::sort(found.begin(), found.end());
      files.insert(files.end(), found.begin(), found.end());
    } else if (fs::is_regular_file(input)) {
      files.emplace_back(input);
    } else {
      throw Error("data input '" + input + "': no such file or folder");
    }
  }
  if (files.empty()) throw Error("no input text files found in the given inputs");
  return files;
}

}  // namespace

namespace {

std::string format_of(const fs::path& file, const std::string& format) {
  if (format != "auto") return format;
  return without_compression(file).extension() == ".jsonl" ? "jsonl" : "text";
}

// A token file written as the tokens come, through a fixed buffer: OUTPUT.tmp, renamed over OUTPUT by
// finish(), removed if the writer goes away before (a failed conversion never leaves a partial file).
// rollback() takes back tokens, for a blank document or a file found not to be text part-way through.
class TokenWriter {
 public:
  TokenWriter(const std::string& output, uint64_t vocab_size, uint32_t tokenizer_id) : target_(output) {
    std::memcpy(header_.magic, "PTTOKENS", 8);
    header_.format_version = 1;
    header_.bytes_per_token = vocab_size <= 65536 ? 2 : 4;
    header_.vocab_size = static_cast<uint32_t>(vocab_size);
    header_.tokenizer = tokenizer_id;
    if (target_.has_parent_path()) fs::create_directories(target_.parent_path());
    temporary_ = target_.string() + ".tmp";
    file_ = std::fopen(temporary_.c_str(), "w+b");
    if (file_ == nullptr) throw Error("cannot write '" + temporary_.string() + "': check the folder exists and is writable");
    buffer_.resize(4 << 20);
    seek(0);
  }
  ~TokenWriter() {
    if (file_ != nullptr) std::fclose(file_), fs::remove(temporary_);
  }
  void put(uint32_t token) {
    if (used_ + 4 > buffer_.size()) flush();
    for (uint32_t byte = 0; byte < header_.bytes_per_token; ++byte) buffer_[used_++] = static_cast<unsigned char>(token >> (8 * byte));
    ++count_;
  }
  uint64_t count() const { return count_; }
  void rollback(uint64_t count) {
    if (count >= flushed_) {
      used_ = (count - flushed_) * header_.bytes_per_token;
    } else {
      // Rare (a blank document over the buffer, a binary file found late): the checksum of the kept
      // tokens is read back from the file.
      seek(0);
      checksum_ = 0;
      for (uint64_t left = count * header_.bytes_per_token; left > 0;) {
        const size_t got = std::fread(buffer_.data(), 1, std::min<uint64_t>(left, buffer_.size()), file_);
        if (got == 0) fail();
        checksum_ = crc32(buffer_.data(), got, checksum_);
        left -= got;
      }
      used_ = 0;
      seek(count);
      flushed_ = count;
    }
    count_ = count;
  }
  void finish(uint64_t documents) {
    flush();
    header_.num_tokens = count_;
    header_.num_documents = documents;
    header_.checksum = checksum_;
    const uint64_t size = sizeof(TokenFileHeader) + count_ * header_.bytes_per_token;
    // A rollback to before the end may have left bytes past the kept tokens.
    if (std::fflush(file_) != 0 || ::ftruncate(::fileno(file_), static_cast<off_t>(size)) != 0) fail();
    if (std::fseek(file_, 0, SEEK_SET) != 0 || std::fwrite(&header_, sizeof(header_), 1, file_) != 1 || std::fclose(file_) != 0) {
      file_ = nullptr;
      fs::remove(temporary_);
      fail();
    }
    file_ = nullptr;
    fs::rename(temporary_, target_);
  }

 private:
  [[noreturn]] void fail() const { throw Error("writing '" + temporary_.string() + "' failed (disk full?)"); }
  void seek(uint64_t token) {
    if (std::fseek(file_, static_cast<long>(sizeof(TokenFileHeader) + token * header_.bytes_per_token), SEEK_SET) != 0) fail();
  }
  void flush() {
    if (used_ > 0 && std::fwrite(buffer_.data(), 1, used_, file_) != used_) fail();
    checksum_ = crc32(buffer_.data(), used_, checksum_);  // of every token in the file, as it grows
    flushed_ += used_ / header_.bytes_per_token;
    used_ = 0;
  }

  fs::path target_, temporary_;
  TokenFileHeader header_{};
  std::FILE* file_ = nullptr;
  std::vector<unsigned char> buffer_;
  size_t used_ = 0;
  uint64_t count_ = 0, flushed_ = 0;  // tokens put (minus those taken back), tokens in the file
  uint64_t checksum_ = 0;             // CRC-32 of the flushed tokens
};

bool blank(const std::string& text) { return text.find_first_not_of(" \t\r\n") == std::string::npos; }

}  // namespace

void write_token_file(const std::string& output, const std::vector<uint32_t>& tokens, uint64_t vocab_size,
                      uint32_t tokenizer_id, uint64_t documents) {
  TokenWriter writer(output, vocab_size, tokenizer_id);
  for (const uint32_t token : tokens) writer.put(token);
  writer.finish(documents);
}

ConvertStats convert_text(const std::vector<std::string>& inputs, const std::string& format,
                          const std::string& output, const TokenizerSpec& tokenizer, bool progress) {
  if (format != "auto" && format != "text" && format != "fortune" && format != "jsonl")
    throw Error("data format '" + format + "' is unknown; use auto, text (a file is a document), fortune or jsonl");
  if (tokenizer.kind != "bytes" && tokenizer.kind != "sentencepiece")
    throw Error("tokenizer '" + tokenizer.kind + "' is unknown; use bytes or sentencepiece (Hugging Face "
                "tokenizer.json files go through scripts/tokenize_hf.py, docs/data.md)");
  const auto files = list_inputs(inputs);
  uint64_t total_bytes = 0;
  for (const auto& file : files) {
    compression_of(file);  // a Parquet (or .xz, ...) file is refused before any work, with the step it needs
    total_bytes += fs::file_size(file);
  }
  ConvertStats stats;
  // Streams every file once, in order: `start_file` before each, `drop_file` when it proves not to be
  // text (a NUL byte), taking back what the sink got from it. The SentencePiece trainer needs a first pass.
  auto read_files = [&](const std::string& label, const DocumentSink& sink, const std::function<void()>& start_file,
                        const std::function<void()>& drop_file) {
    ByteProgress meter(total_bytes, label, progress);
    uint64_t done = 0;
    for (const auto& file : files) {
      start_file();
      const bool text = stream_documents(file, format_of(file, format), sink,
                                         [&](const InputFile& input) { meter.update(done + input.disk_bytes_read(), file); });
      if (!text) drop_file();
      done += fs::file_size(file);
    }
    meter.finish(done);
  };

  uint32_t tokenizer_id = 1;
  std::unique_ptr<SentencePieceEncoder> encoder;
  if (tokenizer.kind == "bytes") {
    stats.vocab_size = kByteVocabSize;
  } else {
    tokenizer_id = 2;
    stats.tokenizer_model = tokenizer.model.empty() ? output + ".model" : tokenizer.model;
    if (tokenizer.train_vocab > 0) {
      // One document per line: SentencePiece trains on lines, and treats newlines as whitespace anyway.
      const std::string corpus = output + ".corpus.tmp";
      {
        std::ofstream out(corpus, std::ios::binary | std::ios::trunc);
        std::string document;
        std::streamoff file_start = 0;
        read_files("tokenizer training pass: ", {[&](const char* bytes, size_t count) { document.append(bytes, count); },
                                                 [&] {
                                                   if (!blank(document)) {
                                                     std::replace(document.begin(), document.end(), '\n', ' ');
                                                     out << document << "\n";
                                                   }
                                                   document.clear();
                                                 }},
                   [&] { file_start = out.tellp(), document.clear(); }, [&] { out.seekp(file_start); });
        const std::streamoff end = out.tellp();
        out.close();
        if (!out) throw Error("writing '" + corpus + "' failed (disk full?)");
        fs::resize_file(corpus, static_cast<uintmax_t>(end));  // a dropped last file may have left bytes beyond
      }
      std::string prefix = stats.tokenizer_model.substr(0, stats.tokenizer_model.size() -
                                                            (stats.tokenizer_model.size() > 6 &&
                                                                     stats.tokenizer_model.substr(stats.tokenizer_model.size() - 6) == ".model"
                                                                 ? 6 : 0));
      stats.tokenizer_model = prefix + ".model";
      train_sentencepiece(corpus, prefix, tokenizer.train_vocab);
      fs::remove(corpus);
    }
    encoder = std::make_unique<SentencePieceEncoder>(stats.tokenizer_model);
    stats.vocab_size = encoder->vocab_size();
  }

  TokenWriter writer(output, stats.vocab_size, tokenizer_id);
  uint64_t document_start = 0, file_start = 0, file_documents = 0;
  bool has_text = false;     // bytes: the current document holds more than whitespace
  std::string document;      // SentencePiece encodes whole documents: one is held at a time
  std::vector<uint32_t> ids;
  DocumentSink sink;
  if (!encoder) {
    // Bytes stream straight to the file; a blank document is taken back at its end.
    sink.append = [&](const char* bytes, size_t count) {
      for (size_t i = 0; i < count; ++i) {
        const auto byte = static_cast<unsigned char>(bytes[i]);
        has_text = has_text || (byte != ' ' && byte != '\t' && byte != '\r' && byte != '\n');
        writer.put(byte);
      }
    };
    sink.end = [&] {
      if (has_text) writer.put(kEndOfDocument), ++stats.documents;
      else writer.rollback(document_start);
      document_start = writer.count(), has_text = false;
    };
  } else {
    sink.append = [&](const char* bytes, size_t count) { document.append(bytes, count); };
    sink.end = [&] {
      if (!blank(document)) {
        ids.clear();
        encoder->encode(document, ids);
        for (const uint32_t id : ids) writer.put(id);
        writer.put(encoder->end_of_document());
        ++stats.documents;
      }
      document.clear();
    };
  }
  read_files(encoder && tokenizer.train_vocab > 0 ? "encoding pass: " : "", sink,
             [&] { file_start = document_start = writer.count(), file_documents = stats.documents, has_text = false, document.clear(); },
             [&] { writer.rollback(file_start), stats.documents = file_documents; });
  stats.files = files.size();
  stats.tokens = writer.count();
  writer.finish(stats.documents);
  return stats;
}

TokenDataset::TokenDataset(const std::string& path) : path_(path) {
  const std::string fix = "; rebuild it with `pithtrain data build --out " + path + " <text files>`";
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error("dataset '" + path + "': cannot open (" + std::strerror(errno) + ")" + fix);
  struct stat info {};
  if (::fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
    ::close(fd);
    throw Error("dataset '" + path + "': not a regular file (data.path names a token file, not a folder)" + fix);
  }
  mapping_size_ = static_cast<size_t>(info.st_size);
  if (mapping_size_ < sizeof(TokenFileHeader)) {
    ::close(fd);
    throw Error("dataset '" + path + "': " + std::to_string(mapping_size_) + " bytes, too short for a token file" + fix);
  }
  mapping_ = ::mmap(nullptr, mapping_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (mapping_ == MAP_FAILED) {
    mapping_ = nullptr;
    throw Error("dataset '" + path + "': mmap failed");
  }
  std::memcpy(&header_, mapping_, sizeof(header_));
  auto fail = [&](const std::string& what) {
    ::munmap(mapping_, mapping_size_);
    mapping_ = nullptr;
    throw Error("dataset '" + path + "': " + what + fix);
  };
  if (std::memcmp(header_.magic, "PTTOKENS", 8) != 0) fail("not a PithTrain token file (bad magic)");
  if (header_.format_version != 1) fail("format version " + std::to_string(header_.format_version) + ", this pithtrain reads 1");
  if (header_.bytes_per_token != 2 && header_.bytes_per_token != 4)
    fail("unsupported token width " + std::to_string(header_.bytes_per_token));
  // Compared as token counts: a damaged num_tokens times the width can wrap around 2^64 and match the size.
  const uint64_t tokens_in_file = (mapping_size_ - sizeof(TokenFileHeader)) / header_.bytes_per_token;
  if (header_.num_tokens != tokens_in_file || (mapping_size_ - sizeof(TokenFileHeader)) % header_.bytes_per_token != 0)
    fail("size is " + std::to_string(mapping_size_) + " bytes but the header promises " + std::to_string(header_.num_tokens) +
         " tokens of " + std::to_string(header_.bytes_per_token) + " bytes plus its " + std::to_string(sizeof(TokenFileHeader)) +
         "-byte header (truncated or corrupt)");
  tokens_ = static_cast<const unsigned char*>(mapping_) + sizeof(TokenFileHeader);
  if (crc32(tokens_, header_.num_tokens * header_.bytes_per_token) != header_.checksum) fail("checksum mismatch (corrupt)");
  for (uint64_t i = 0; i < header_.num_tokens; ++i)
    if (token(i) >= header_.vocab_size)
      fail("token " + std::to_string(i) + " is " + std::to_string(token(i)) + ", not below the header's vocab_size " +
           std::to_string(header_.vocab_size));
}

TokenDataset::~TokenDataset() {
  if (mapping_ != nullptr) ::munmap(mapping_, mapping_size_);
}

uint64_t TokenDataset::token(uint64_t index) const {
  if (header_.bytes_per_token == 2) {
    uint16_t value;
    std::memcpy(&value, tokens_ + index * 2, 2);
    return value;
  }
  uint32_t value;
  std::memcpy(&value, tokens_ + index * 4, 4);
  return value;
}

at::Tensor TokenDataset::windows(const std::vector<uint64_t>& offsets, int64_t length) const {
  at::Tensor result = at::empty({static_cast<int64_t>(offsets.size()), length}, at::kLong);
  int64_t* out = result.data_ptr<int64_t>();
  for (size_t row = 0; row < offsets.size(); ++row) {
    if (offsets[row] + static_cast<uint64_t>(length) > size())
      throw Error("dataset '" + path_ + "': window at " + std::to_string(offsets[row]) + " runs past the end");
    for (int64_t i = 0; i < length; ++i) out[row * length + i] = static_cast<int64_t>(token(offsets[row] + i));
  }
  return result;
}

WindowOrder::WindowOrder(uint64_t begin, uint64_t end, int64_t length, uint64_t seed)
    : begin_(begin), stride_(static_cast<uint64_t>(length - 1)), seed_(seed) {
  count_ = end > begin + 1 ? (end - begin - 1) / stride_ : 0;
  if (count_ == 0)
    throw Error("the token range [" + std::to_string(begin) + ", " + std::to_string(end) + ") holds no window of " +
                std::to_string(length) + " tokens; use more data or a shorter train.seq_len");
  if (count_ > UINT32_MAX) throw Error("more than 2^32 windows per epoch; raise train.seq_len");
}

uint64_t WindowOrder::next() {
  const uint64_t epoch = position_ / count_;
  if (epoch != cached_epoch_) {
    order_.resize(count_);
    for (uint64_t i = 0; i < count_; ++i) order_[i] = static_cast<uint32_t>(i);
    std::mt19937_64 generator(seed_ + epoch);
    for (uint64_t i = count_ - 1; i > 0; --i) std::swap(order_[i], order_[generator() % (i + 1)]);
    cached_epoch_ = epoch;
  }
  return begin_ + order_[position_++ % count_] * stride_;
}

}  // namespace pithtrain
