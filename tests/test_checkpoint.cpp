// Checkpoint files on their own: the whole-file checksum against every flipped bit, files of the older
// tensor-bytes-only checksum, the streaming reader and writer against the whole-file ones, Python's
// safetensors reading what we write, and the checkpoint folder's handling of unfinished and failed saves.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <ATen/ATen.h>

#include "checkpoint.h"

namespace fs = std::filesystem;
using namespace pithtrain;

namespace {

fs::path fresh_dir(const std::string& name) {
  fs::path dir = fs::temp_directory_path() / ("pithtrain_test_checkpoint_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const fs::path& path, const std::string& bytes) {
  fs::remove(path);  // a new file: ext4 flushes a truncated-and-rewritten one on close, which is slow
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string load_error(const fs::path& path) {
  try {
    load_safetensors(path.string());
  } catch (const Error& error) {
    return error.what();
  }
  return "(no error)";
}

// A small checkpoint as the trainer writes one: the metadata keys it uses (a multi-line TOML value
// among them) and tensors of several dtypes, one of them 0-dimensional.
std::vector<NamedTensor> small_tensors() {
  at::manual_seed(7);
  return {{"model/embedding.weight", at::randn({5, 3})},
          {"model/layers.0.router.expert_bias", at::randn({4}, at::kDouble)},
          {"optimizer/step", at::tensor(int64_t{12})},
          {"optimizer/lm_head.weight.exp_avg", at::randn({2, 3}).to(at::kBFloat16)},
          {"model/mask", at::tensor({1, 0, 1}, at::kByte).to(at::kBool)}};
}

const std::map<std::string, std::string> kMetadata = {
    {"step", "12"}, {"data_position", "345"}, {"smoothed_loss", "2.5"},
    {"model_config", "[model]\nhidden_size = 64\nname = \"tiny \\\"quoted\\\"\"\n"}, {"data_path", "data/x.tokens"}};

// The FNV-1a 64 the older writer used, written out here so the old format does not depend on the new
// code; it started from 1469598103934665603 (not the standard 14695981039346656037).
uint64_t old_fnv1a(const std::string& bytes) {
  uint64_t hash = 1469598103934665603ull;
  for (unsigned char byte : bytes) hash = (hash ^ byte) * 1099511628211ull;
  return hash;
}

// A file exactly as the writer before the whole-file checksum produced it: sorted metadata with
// "checksum" (FNV-1a 64 over the tensor bytes) and "producer", entries in order, space padding to 8.
std::string old_format_file(const std::string& data_checksum_override = "") {
  std::string data;
  const float weights[4] = {1.5f, -2.0f, 0.25f, 3.0f};
  const int64_t counts[2] = {7, -9};
  data.append(reinterpret_cast<const char*>(weights), sizeof(weights));
  data.append(reinterpret_cast<const char*>(counts), sizeof(counts));
  char checksum[20];
  std::snprintf(checksum, sizeof(checksum), "%016llx", static_cast<unsigned long long>(old_fnv1a(data)));
  std::string header = std::string("{\"__metadata__\":{\"checksum\":\"") +
                       (data_checksum_override.empty() ? checksum : data_checksum_override) +
                       "\",\"producer\":\"pithtrain\",\"step\":\"7\"},"
                       "\"model/w\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
                       "\"optimizer/counts\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[16,32]}}";
  while (header.size() % 8 != 0) header += ' ';
  const uint64_t size = header.size();
  return std::string(reinterpret_cast<const char*>(&size), 8) + header + data;
}

}  // namespace

TEST(Safetensors, RoundTripsTensorsAndMetadataWithAWholeFileChecksum) {
  const fs::path path = fresh_dir("round_trip") / "a.safetensors";
  const auto tensors = small_tensors();
  save_safetensors(path.string(), tensors, kMetadata);
  EXPECT_FALSE(fs::exists(path.string() + ".tmp"));
  SafetensorsFile file = load_safetensors(path.string());
  ASSERT_EQ(file.tensors.size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    EXPECT_EQ(file.tensors[i].name, tensors[i].name);
    EXPECT_TRUE(at::equal(file.tensors[i].tensor, tensors[i].tensor)) << tensors[i].name;
  }
  for (const auto& [key, value] : kMetadata) EXPECT_EQ(file.metadata.at(key), value) << key;
  EXPECT_EQ(file.metadata.at("checksum_scheme"), "fnv1a64-whole-file");
  EXPECT_EQ(file.metadata.at("file_checksum").size(), 16u);
  EXPECT_EQ(file.metadata.count("checksum"), 0u);  // the older tensor-bytes checksum is not written any more
  // The checksum field opens the header, where docs/training.md says it is.
  EXPECT_EQ(read_bytes(path).substr(8, 34), "{\"__metadata__\":{\"file_checksum\":\"");

  // Metadata read back from a file (checksum keys included) can be saved again: the writer owns them.
  const fs::path again = path.parent_path() / "b.safetensors";
  save_safetensors(again.string(), file.tensors, file.metadata);
  SafetensorsFile reread = load_safetensors(again.string());
  EXPECT_EQ(reread.metadata.at("step"), "12");
  EXPECT_EQ(reread.metadata.at("file_checksum"), file.metadata.at("file_checksum"));  // same content, same checksum
}

TEST(Safetensors, EveryFlippedBitAnywhereInTheFileIsRefusedNamingTheFile) {
  const fs::path dir = fresh_dir("flips");
  const fs::path original = dir / "step_000000012.safetensors";
  save_safetensors(original.string(), small_tensors(), kMetadata);
  const std::string bytes = read_bytes(original);
  uint64_t header_size = 0;
  std::memcpy(&header_size, bytes.data(), 8);
  const std::string header = bytes.substr(8, header_size);
  // The regions the flips must reach, each found in the file itself.
  for (const char* part : {"\"step\":\"12\"", "\"model_config\":", "\"checksum_scheme\":", "\"data_offsets\":[", "\"BF16\""})
    ASSERT_NE(header.find(part), std::string::npos) << part;
  ASSERT_GT(bytes.size(), 8 + header_size + 16) << "the file has a data section";

  // Every bit of the file: the length prefix, the checksum digits, the metadata, the tensor entries,
  // the padding and the data.
  const fs::path flipped = dir / "flipped.safetensors";
  size_t refused = 0;
  for (size_t byte = 0; byte < bytes.size(); ++byte)
    for (int bit = 0; bit < 8; ++bit) {
      std::string damaged = bytes;
      damaged[byte] = static_cast<char>(damaged[byte] ^ (1 << bit));
      write_bytes(flipped, damaged);
      const std::string error = load_error(flipped);
      const bool named = error.find("'" + flipped.string() + "'") != std::string::npos && error.find("damaged") != std::string::npos;
      EXPECT_TRUE(named) << "byte " << byte << " bit " << bit << ": " << error;
      if (!named) return;  // one failure says enough; thousands would drown it
      ++refused;
    }
  EXPECT_EQ(refused, bytes.size() * 8);
  // Truncated and extended files too.
  for (size_t length : {size_t{0}, size_t{5}, size_t{8}, size_t{40}, static_cast<size_t>(8 + header_size), bytes.size() - 1}) {
    write_bytes(flipped, bytes.substr(0, length));
    EXPECT_NE(load_error(flipped).find("damaged"), std::string::npos) << "truncated to " << length;
  }
  write_bytes(flipped, bytes + "x");
  EXPECT_NE(load_error(flipped).find("damaged"), std::string::npos) << "one byte appended";
  EXPECT_EQ(load_error(original), "(no error)");
}

TEST(Safetensors, FilesOfTheOlderTensorBytesChecksumStillLoadAndVerify) {
  const fs::path dir = fresh_dir("old_format");
  const fs::path path = dir / "step_000000007.safetensors";
  const std::string bytes = old_format_file();
  write_bytes(path, bytes);
  SafetensorsFile file = load_safetensors(path.string());
  EXPECT_EQ(file.metadata.at("step"), "7");
  ASSERT_NE(file.find("model/w"), nullptr);
  EXPECT_TRUE(at::equal(*file.find("model/w"), at::tensor({1.5f, -2.0f, 0.25f, 3.0f}).reshape({2, 2})));
  EXPECT_TRUE(at::equal(*file.find("optimizer/counts"), at::tensor({int64_t{7}, int64_t{-9}})));

  // Its checksum is still checked: a flipped data bit, or a wrong stored value, is refused.
  std::string flipped = bytes;
  flipped[bytes.size() - 3] = static_cast<char>(flipped[bytes.size() - 3] ^ 0x10);
  write_bytes(path, flipped);
  std::string error = load_error(path);
  EXPECT_NE(error.find("'" + path.string() + "' is damaged"), std::string::npos) << error;
  EXPECT_NE(error.find("checksum mismatch"), std::string::npos) << error;
  write_bytes(path, old_format_file("0123456789abcdef"));
  EXPECT_NE(load_error(path).find("checksum mismatch"), std::string::npos);

  // A checkpoint folder resumes from an old file like from a new one.
  write_bytes(path, bytes);
  auto latest = CheckpointFolder(dir, 3).load_latest();
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->first, path);

  // A foreign file (no checksum at all, as Hugging Face writes them) loads unverified, as before.
  std::string foreign = "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
  while (foreign.size() % 8 != 0) foreign += ' ';
  const uint64_t size = foreign.size();
  const float one = 1.0f;
  write_bytes(dir / "foreign.safetensors",
              std::string(reinterpret_cast<const char*>(&size), 8) + foreign + std::string(reinterpret_cast<const char*>(&one), 4));
  EXPECT_EQ(load_safetensors((dir / "foreign.safetensors").string()).find("w")->item<float>(), 1.0f);
}

std::string reader_error(const fs::path& path) {
  try {
    SafetensorsReader reader(path.string());
    for (const auto& entry : reader.tensors()) reader.read(entry);
  } catch (const Error& error) {
    return error.what();
  }
  return "(no error)";
}

// SafetensorsWriter and SafetensorsReader (convert import, tensor by tensor) against the whole-file functions:
// the same bytes, the same tensors, the same refusals.
TEST(Safetensors, TheStreamingWriterAndReaderMatchTheWholeFileOnes) {
  const fs::path dir = fresh_dir("streaming");
  const auto tensors = small_tensors();
  save_safetensors((dir / "whole.safetensors").string(), tensors, kMetadata);
  std::vector<TensorEntry> layout;
  for (const auto& item : tensors) layout.push_back({item.name, item.tensor.scalar_type(), item.tensor.sizes().vec()});
  {
    SafetensorsWriter writer((dir / "streamed.safetensors").string(), layout, kMetadata);
    for (const auto& item : tensors) writer.write(item.name, item.tensor);
    writer.commit();
  }
  const std::string bytes = read_bytes(dir / "whole.safetensors");
  EXPECT_EQ(read_bytes(dir / "streamed.safetensors"), bytes) << "the streamed file differs from save_safetensors'";

  SafetensorsReader reader((dir / "streamed.safetensors").string());
  ASSERT_EQ(reader.tensors().size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    EXPECT_EQ(reader.tensors()[i].name, tensors[i].name);
    EXPECT_TRUE(at::equal(reader.read(*reader.find(tensors[i].name)), tensors[i].tensor)) << tensors[i].name;
  }
  EXPECT_EQ(reader.metadata().at("model_config"), kMetadata.at("model_config"));
  // read_into fills one slice of a stack in place.
  at::Tensor stacked = at::zeros({2, 5, 3});
  reader.read_into(*reader.find("model/embedding.weight"), stacked[1]);
  EXPECT_TRUE(at::equal(stacked[1], tensors[0].tensor));
  EXPECT_TRUE(at::equal(stacked[0], at::zeros({5, 3})));
  EXPECT_THROW(reader.read_into(*reader.find("model/embedding.weight"), at::zeros({5, 3}, at::kDouble)), Error);

  // The reader refuses every flipped bit, as load_safetensors does, naming the file.
  const fs::path flipped = dir / "flipped.safetensors";
  for (size_t byte = 0; byte < bytes.size(); ++byte)
    for (int bit = 0; bit < 8; ++bit) {
      std::string damaged = bytes;
      damaged[byte] = static_cast<char>(damaged[byte] ^ (1 << bit));
      write_bytes(flipped, damaged);
      const std::string error = reader_error(flipped);
      const bool named = error.find("'" + flipped.string() + "'") != std::string::npos && error.find("damaged") != std::string::npos;
      ASSERT_TRUE(named) << "byte " << byte << " bit " << bit << ": " << error;
    }
  for (size_t length : {size_t{0}, size_t{5}, size_t{40}, bytes.size() - 1}) {
    write_bytes(flipped, bytes.substr(0, length));
    EXPECT_NE(reader_error(flipped).find("damaged"), std::string::npos) << "truncated to " << length;
  }
  // Files of the older checksum verify (and a flipped data bit is refused) when streamed too.
  write_bytes(flipped, old_format_file());
  EXPECT_EQ(reader_error(flipped), "(no error)");
  std::string old = old_format_file();
  old[old.size() - 3] = static_cast<char>(old[old.size() - 3] ^ 0x10);
  write_bytes(flipped, old);
  EXPECT_NE(reader_error(flipped).find("checksum mismatch (stored"), std::string::npos) << reader_error(flipped);

  // A writer given tensors out of its plan, or committed short, throws and leaves no file behind.
  const fs::path partial = dir / "partial.safetensors";
  {
    SafetensorsWriter writer(partial.string(), layout);
    EXPECT_THROW(writer.write(tensors[1].name, tensors[1].tensor), Error);
    writer.write(tensors[0].name, tensors[0].tensor);
    EXPECT_THROW(writer.write(tensors[1].name, tensors[1].tensor.to(at::kFloat)), Error);  // planned as double
    EXPECT_THROW(writer.commit(), Error);
  }
  EXPECT_FALSE(fs::exists(partial));
  EXPECT_FALSE(fs::exists(partial.string() + ".tmp"));
}

TEST(Safetensors, PythonSafetensorsReadsANewFileAndRecomputesItsChecksum) {
  const fs::path dir = fresh_dir("python");
  const fs::path path = dir / "step_000000012.safetensors";
  save_safetensors(path.string(), {{"w", at::arange(6, at::kFloat).reshape({2, 3})}, {"n", at::tensor({int64_t{4}, int64_t{-1}})}},
                   kMetadata);
  // The documented scheme, implemented independently: FNV-1a 64 over the file with the 16 digits
  // that follow the header's fixed opening read as '0'.
  const fs::path script = dir / "read.py";
  std::ofstream(script) << R"(import struct, sys
from safetensors import safe_open
path = sys.argv[1]
with safe_open(path, framework="numpy") as f:
    meta = f.metadata()
    w, n = f.get_tensor("w"), f.get_tensor("n")
data = bytearray(open(path, "rb").read())
opening = b'{"__metadata__":{"file_checksum":"'
assert data[8:8 + len(opening)] == opening, data[:64]
at = 8 + len(opening)
stored = data[at:at + 16].decode()
data[at:at + 16] = b"0" * 16
h = 0xcbf29ce484222325
for byte in data:
    h = ((h ^ byte) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
print("shape", list(w.shape), "sum", float(w.sum()), "n", n.tolist(), "step", meta["step"],
      "scheme", meta["checksum_scheme"], "stored_matches", stored == meta["file_checksum"] == "%016x" % h)
)";
  const std::string command = std::string(PITHTRAIN_PYTHON) + " " + script.string() + " " + path.string() + " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string output;
  char buffer[512];
  while (std::fgets(buffer, sizeof(buffer), pipe)) output += buffer;
  EXPECT_EQ(::pclose(pipe), 0) << output;
  EXPECT_EQ(output, "shape [2, 3] sum 15.0 n [4, -1] step 12 scheme fnv1a64-whole-file stored_matches True\n");
}

TEST(CheckpointFolder, RemovesUnfinishedSavesOfItsOwnCheckpointsOnly) {
  const fs::path dir = fresh_dir("unfinished");
  CheckpointFolder folder(dir, 3);
  folder.save(4, small_tensors(), kMetadata);
  // What a process killed while saving leaves, and files that only look similar.
  write_bytes(dir / "step_000000005.safetensors.tmp", std::string(1000, 'x'));
  write_bytes(dir / "step_000000003.safetensors.tmp", "half");
  for (const char* other : {"notes.tmp", "step_x.safetensors.tmp", "model.safetensors.tmp", "step_000000002.safetensors.tmp.keep"})
    write_bytes(dir / other, "keep me");
  const fs::path saved = folder.save(6, small_tensors(), kMetadata);
  EXPECT_FALSE(fs::exists(dir / "step_000000005.safetensors.tmp"));
  EXPECT_FALSE(fs::exists(dir / "step_000000003.safetensors.tmp"));
  for (const char* other : {"notes.tmp", "step_x.safetensors.tmp", "model.safetensors.tmp", "step_000000002.safetensors.tmp.keep"})
    EXPECT_EQ(read_bytes(dir / other), "keep me") << other;
  EXPECT_EQ(folder.list(), (std::vector<fs::path>{saved, dir / "step_000000004.safetensors"}));
  EXPECT_EQ(folder.load_latest()->first, saved);
}

TEST(CheckpointFolder, ListsByStepNumberAndKeepsTheNewest) {
  const fs::path dir = fresh_dir("keep");
  CheckpointFolder folder(dir, 2);
  for (int64_t step : {999999999, 1000000000, 5}) folder.save(step, {{"x", at::ones({1})}}, {{"step", std::to_string(step)}});
  // Step 1000000000 has ten digits and is still the newest; the just-written step 5 is kept beside
  // the newest two (a folder can hold later steps from before checkpoint.resume = false).
  EXPECT_EQ(folder.list(), (std::vector<fs::path>{dir / "step_1000000000.safetensors", dir / "step_999999999.safetensors",
                                                  dir / "step_000000005.safetensors"}));
  folder.save(6, {{"x", at::ones({1})}}, {{"step", "6"}});
  EXPECT_EQ(folder.list(), (std::vector<fs::path>{dir / "step_1000000000.safetensors", dir / "step_999999999.safetensors",
                                                  dir / "step_000000006.safetensors"}));
}

TEST(CheckpointFolder, AFailedWriteThrowsNamingTheFileRemovesItsTemporaryAndKeepsThePreviousCheckpoint) {
  const fs::path dir = fresh_dir("failed_write");
  CheckpointFolder folder(dir, 1);
  const fs::path first = folder.save(1, {{"x", at::ones({16})}}, {{"step", "1"}});
  // A file-size limit makes write() fail part-way, as a full disk would (EFBIG instead of ENOSPC;
  // the full-disk message itself is checked by ctest checkpoint_disk_full on a small tmpfs).
  struct rlimit previous {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &previous), 0);
  auto* previous_handler = ::signal(SIGXFSZ, SIG_IGN);
  struct rlimit limited = previous;
  limited.rlim_cur = 64 * 1024;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &limited), 0);
  std::string error = "(no error)";
  try {
    folder.save(2, {{"x", at::ones({64 * 1024})}}, {{"step", "2"}});
  } catch (const Error& failure) {
    error = failure.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &previous);
  ::signal(SIGXFSZ, previous_handler);
  const fs::path second = dir / "step_000000002.safetensors";
  EXPECT_NE(error.find("cannot save '" + second.string() + "'"), std::string::npos) << error;
  EXPECT_NE(error.find(std::strerror(EFBIG)), std::string::npos) << error;
  EXPECT_NE(error.find("the newest complete checkpoint is " + first.string()), std::string::npos) << error;
  EXPECT_EQ(error.find('\n'), std::string::npos) << "one line: " << error;
  EXPECT_FALSE(fs::exists(second.string() + ".tmp"));
  EXPECT_FALSE(fs::exists(second));
  auto latest = folder.load_latest();
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->first, first);
  EXPECT_TRUE(at::equal(*latest->second.find("x"), at::ones({16})));
}
