// Token files: text -> packed uint16 tokens, and validated memory-mapped reading.
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
#include <sstream>

#include <ATen/ATen.h>

#include "json.h"
#include "pithtrain/error.h"
#include "sentencepiece_tokenizer.h"

namespace pithtrain {
namespace fs = std::filesystem;

namespace {

// CRC-32 (IEEE 802.3, as zlib's crc32), so tools in other languages can write token files cheaply.
uint64_t crc32(const uint8_t* bytes, size_t count) {
  static const auto table = [] {
    std::array<uint32_t, 256> entries{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t value = i;
      for (int bit = 0; bit < 8; ++bit) value = (value & 1) ? 0xEDB88320u ^ (value >> 1) : value >> 1;
      entries[i] = value;
    }
    return entries;
  }();
  uint32_t crc = 0xFFFFFFFFu;
  for (size_t i = 0; i < count; ++i) crc = table[(crc ^ bytes[i]) & 0xFF] ^ (crc >> 8);
  return crc ^ 0xFFFFFFFFu;
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
  return file.extension() == ".jsonl" ? "jsonl" : "text";
}

// Calls `emit` with every document of `file` in the given format.
void for_each_document(const fs::path& file, const std::string& content, const std::string& format,
                       const std::function<void(const std::string&)>& emit) {
  if (format == "text") return emit(content);
  std::istringstream lines(content);
  std::string line, document;
  size_t line_number = 0;
  while (std::getline(lines, line)) {
    ++line_number;
    if (format == "jsonl") {
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      JsonValue record = parse_json(line, file.string() + ":" + std::to_string(line_number));
      const JsonValue* text = record.find("text");
      if (text == nullptr || text->type != JsonValue::Type::String)
        throw Error(file.string() + ":" + std::to_string(line_number) + ": a .jsonl line needs a string field \"text\"");
      emit(text->text);
    } else if (line == "%") {
      emit(document);
      document.clear();
    } else {
      document += line + "\n";
    }
  }
  if (format == "fortune") emit(document);
}

}  // namespace

void write_token_file(const std::string& output, const std::vector<uint32_t>& tokens, uint64_t vocab_size,
                      uint32_t tokenizer_id, uint64_t documents) {
  TokenFileHeader header{};
  std::memcpy(header.magic, "PTTOKENS", 8);
  header.format_version = 1;
  header.bytes_per_token = vocab_size <= 65536 ? 2 : 4;
  header.vocab_size = static_cast<uint32_t>(vocab_size);
  header.tokenizer = tokenizer_id;
  header.num_tokens = tokens.size();
  header.num_documents = documents;
  std::vector<unsigned char> bytes(tokens.size() * header.bytes_per_token);
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (header.bytes_per_token == 2) {
      uint16_t value = static_cast<uint16_t>(tokens[i]);
      std::memcpy(bytes.data() + i * 2, &value, 2);
    } else {
      std::memcpy(bytes.data() + i * 4, &tokens[i], 4);
    }
  }
  header.checksum = crc32(bytes.data(), bytes.size());
  fs::path target(output);
  if (target.has_parent_path()) fs::create_directories(target.parent_path());
  fs::path temporary = target.string() + ".tmp";
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    if (!out) throw Error("cannot write '" + temporary.string() + "': check the folder exists and is writable");
    out.write(reinterpret_cast<const char*>(&header), sizeof(header));
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    if (!out) throw Error("writing '" + temporary.string() + "' failed (disk full?)");
  }
  fs::rename(temporary, target);
}

ConvertStats convert_text(const std::vector<std::string>& inputs, const std::string& format,
                          const std::string& output, const TokenizerSpec& tokenizer, bool progress) {
  if (format != "auto" && format != "text" && format != "fortune" && format != "jsonl")
    throw Error("data format '" + format + "' is unknown; use auto, text (a file is a document), fortune or jsonl");
  if (tokenizer.kind != "bytes" && tokenizer.kind != "sentencepiece")
    throw Error("tokenizer '" + tokenizer.kind + "' is unknown; use bytes or sentencepiece (Hugging Face "
                "tokenizer.json files go through scripts/tokenize_hf.py, docs/data.md)");
  const auto files = list_inputs(inputs);
  ConvertStats stats;
  // Reads every document once, in order; the SentencePiece trainer needs a first pass over them.
  auto read_documents = [&](const std::function<void(const std::string&)>& emit) {
    uint64_t bytes_read = 0, next_report = 64ull << 20;
    for (const auto& file : files) {
      std::ifstream stream(file, std::ios::binary);
      std::stringstream buffer;
      buffer << stream.rdbuf();
      std::string content = buffer.str();
      if (content.find('\0') != std::string::npos) continue;  // not text
      for_each_document(file, content, format_of(file, format), [&](const std::string& document) {
        if (document.find_first_not_of(" \t\r\n") != std::string::npos) emit(document);
      });
      bytes_read += content.size();
      if (progress && bytes_read >= next_report) {
        std::fprintf(stderr, "[data] %.0f MiB read, %s\n", bytes_read / 1048576.0, file.c_str());
        next_report += 64ull << 20;
      }
    }
  };

  std::vector<uint32_t> tokens;
  uint32_t tokenizer_id = 1;
  if (tokenizer.kind == "bytes") {
    stats.vocab_size = kByteVocabSize;
    read_documents([&](const std::string& document) {
      for (unsigned char byte : document) tokens.push_back(byte);
      tokens.push_back(kEndOfDocument);
      ++stats.documents;
    });
  } else {
    tokenizer_id = 2;
    stats.tokenizer_model = tokenizer.model.empty() ? output + ".model" : tokenizer.model;
    if (tokenizer.train_vocab > 0) {
      // One document per line: SentencePiece trains on lines, and treats newlines as whitespace anyway.
      const std::string corpus = output + ".corpus.tmp";
      {
        std::ofstream out(corpus);
        read_documents([&](const std::string& document) {
          std::string line = document;
          std::replace(line.begin(), line.end(), '\n', ' ');
          out << line << "\n";
        });
      }
      std::string prefix = stats.tokenizer_model.substr(0, stats.tokenizer_model.size() -
                                                            (stats.tokenizer_model.size() > 6 &&
                                                                     stats.tokenizer_model.substr(stats.tokenizer_model.size() - 6) == ".model"
                                                                 ? 6 : 0));
      stats.tokenizer_model = prefix + ".model";
      train_sentencepiece(corpus, prefix, tokenizer.train_vocab);
      fs::remove(corpus);
    }
    SentencePieceEncoder encoder(stats.tokenizer_model);
    stats.vocab_size = encoder.vocab_size();
    read_documents([&](const std::string& document) {
      encoder.encode(document, tokens);
      tokens.push_back(encoder.end_of_document());
      ++stats.documents;
    });
  }
  stats.files = files.size();
  stats.tokens = tokens.size();
  write_token_file(output, tokens, stats.vocab_size, tokenizer_id, stats.documents);
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
