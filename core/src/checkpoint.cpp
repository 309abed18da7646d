// Safetensors reading and writing with a whole-file checksum, crash-safe saves (temporary file,
// fsync, rename), and the run's checkpoint folder: keep-last-K, unfinished saves, newest-valid-first.
#include "checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <sstream>
#include <string_view>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <spdlog/spdlog.h>

#include "json.h"

namespace pithtrain {
namespace fs = std::filesystem;

namespace {

static_assert(std::endian::native == std::endian::little, "safetensors stores little-endian numbers");

// FNV-1a 64. Each byte's step is a bijection of the running hash, so a change confined to one byte
// (any single flipped bit) always changes the result.
uint64_t fnv1a(const char* bytes, size_t count, uint64_t hash) {
  for (size_t i = 0; i < count; ++i) hash = (hash ^ static_cast<uint8_t>(bytes[i])) * 1099511628211ull;
  return hash;
}
constexpr uint64_t kFnvOffset = 14695981039346656037ull;  // FNV-1a 64's standard offset basis
// The older tensor-bytes checksum started from this value (the standard basis missing its last digit);
// kept so that files written with it still verify.
constexpr uint64_t kOldFnvOffset = 1469598103934665603ull;

// The whole-file scheme. The header opens with this fixed text followed by the checksum's 16 hex
// digits, so the digits sit at a fixed offset and the checksum can cover every other byte of the
// file (length prefix, header, data), read with the digits as "0000000000000000". The metadata also
// names the scheme (kSchemeMark) further on in the header: one flipped bit can spoil one of the two
// marks but not both, so a damaged new file is never taken for an old or foreign one.
constexpr std::string_view kHeaderOpening = R"({"__metadata__":{"file_checksum":")";
constexpr size_t kDigitsAt = 8 + kHeaderOpening.size();
constexpr size_t kDigits = 16;
constexpr std::string_view kSchemeKey = "checksum_scheme";
constexpr std::string_view kScheme = "fnv1a64-whole-file";
constexpr std::string_view kSchemeMark = R"("checksum_scheme":)";
const std::string kZeroDigits(kDigits, '0');
// Files written before the whole-file scheme carry metadata "checksum": FNV-1a 64 over the tensor
// bytes alone, in header order; they are still verified that way.
constexpr std::string_view kDataChecksumKey = "checksum";

constexpr size_t kChunk = size_t{16} << 20;  // hashed, then written, while it is still in cache

const std::vector<std::pair<at::ScalarType, std::string>> kDtypes = {
    {at::kFloat, "F32"}, {at::kDouble, "F64"}, {at::kBFloat16, "BF16"}, {at::kHalf, "F16"},
    {at::kLong, "I64"},  {at::kInt, "I32"},    {at::kByte, "U8"},       {at::kBool, "BOOL"}};

std::string hex(uint64_t value) {
  char buffer[20];
  std::snprintf(buffer, sizeof(buffer), "%016llx", static_cast<unsigned long long>(value));
  return buffer;
}

std::string describe(int error) {
  if (error == ENOSPC || error == EDQUOT) return std::string("disk full (") + std::strerror(error) + ")";
  return std::strerror(error);
}

std::string damaged(const std::string& path, const std::string& what) {
  return "'" + path + "' is damaged: " + what + "; restore it from a copy or delete it";
}

// Flushes a folder's entries (a rename, a new file) to disk. Some file systems cannot sync a folder
// (EINVAL); there the rename is as durable as that file system makes it.
void sync_folder(const fs::path& folder, const std::string& saving) {
  const fs::path target = folder.empty() ? fs::path(".") : folder;
  const int fd = ::open(target.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    const int error = errno;
    throw Error("cannot save '" + saving + "': cannot open its folder to flush it: " + describe(error));
  }
  const int result = ::fsync(fd), error = errno;
  ::close(fd);
  if (result != 0 && error != EINVAL)
    throw Error("cannot save '" + saving + "': flushing its folder '" + target.string() + "' to disk failed: " +
                describe(error) + "; the file is written but may not survive a power loss");
}

// PATH.tmp while a save is under way; removed unless committed, so a failed save neither leaves a
// partial file under the real name nor keeps the space it took.
class TemporaryFile {
 public:
  TemporaryFile(std::string final_path, uint64_t total) : final_(std::move(final_path)), path_(final_ + ".tmp"), total_(total) {
    ::unlink(path_.c_str());  // one left by a killed save: start afresh rather than write through it
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd_ < 0) fail(errno, "creating");
  }
  TemporaryFile(const TemporaryFile&) = delete;
  TemporaryFile& operator=(const TemporaryFile&) = delete;
  ~TemporaryFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(path_.c_str());
  }

  void write(const char* bytes, size_t count) {
    while (count > 0) {
      const ssize_t written = ::write(fd_, bytes, std::min<size_t>(count, size_t{1} << 30));
      if (written < 0 && errno == EINTR) continue;
      if (written <= 0) fail(written < 0 ? errno : EIO, "writing");
      bytes += written, count -= static_cast<size_t>(written), written_ += static_cast<uint64_t>(written);
    }
  }
  void write_at(uint64_t offset, const char* bytes, size_t count) {
    while (count > 0) {
      const ssize_t written = ::pwrite(fd_, bytes, count, static_cast<off_t>(offset));
      if (written < 0 && errno == EINTR) continue;
      if (written <= 0) fail(written < 0 ? errno : EIO, "writing");
      bytes += written, count -= static_cast<size_t>(written), offset += static_cast<uint64_t>(written);
    }
  }
  // fsync, close, rename over the real name, fsync the folder: after this the file is in place.
  void commit() {
    if (::fsync(fd_) != 0) fail(errno, "flushing", " to disk");
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) fail(errno, "closing");
    if (::rename(path_.c_str(), final_.c_str()) != 0) fail(errno, "renaming", " to its name");
    committed_ = true;
    sync_folder(fs::path(final_).parent_path(), final_);
  }

 private:
  // `error` comes first so that errno is read before anything else can change it.
  [[noreturn]] void fail(int error, const char* doing, const char* rest = "") {
    if (fd_ >= 0) ::close(fd_), fd_ = -1;
    ::unlink(path_.c_str());  // now, before the error travels: the space is free for whoever handles it
    const bool full = error == ENOSPC || error == EDQUOT;
    const bool unwritable = error == ENOENT || error == EACCES || error == EPERM || error == EROFS;
    throw Error("cannot save '" + final_ + "': " + describe(error) + " while " + doing + " '" + path_ + "'" + rest +
                " (" + std::to_string(written_) + " of " + std::to_string(total_) + " bytes written); the partial file " +
                "is removed and any earlier '" + fs::path(final_).filename().string() + "' is untouched" +
                (full ? "; free space on that disk (or write elsewhere) and rerun"
                      : unwritable ? "; check that the folder exists and is writable" : ""));
  }

  std::string final_, path_;
  uint64_t total_ = 0, written_ = 0;
  int fd_ = -1;
  bool committed_ = false;
};

std::string read_whole_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int error = errno;
    throw Error("cannot open '" + path + "': " + std::strerror(error));
  }
  struct stat info {};
  if (::fstat(fd, &info) != 0) {
    const int error = errno;
    ::close(fd);
    throw Error("cannot read '" + path + "': " + std::strerror(error));
  }
  std::string content(static_cast<size_t>(info.st_size), '\0');
  size_t filled = 0;
  while (filled < content.size()) {
    const ssize_t got = ::read(fd, content.data() + filled, content.size() - filled);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      const int error = errno;
      ::close(fd);
      throw Error("cannot read '" + path + "': " + std::strerror(error));
    }
    if (got == 0) break;  // it shrank while being read: the checks below see a truncated file
    filled += static_cast<size_t>(got);
  }
  ::close(fd);
  content.resize(filled);
  return content;
}

// Checks the whole-file checksum before anything in the header is trusted.
void verify_whole_file(const std::string& path, const std::string& content) {
  if (content.size() < kDigitsAt + kDigits || content.compare(8, kHeaderOpening.size(), kHeaderOpening) != 0)
    throw Error(damaged(path, "its header does not open with the file_checksum field that its checksum_scheme promises"));
  uint64_t checksum = fnv1a(content.data(), kDigitsAt, kFnvOffset);
  checksum = fnv1a(kZeroDigits.data(), kDigits, checksum);
  checksum = fnv1a(content.data() + kDigitsAt + kDigits, content.size() - kDigitsAt - kDigits, checksum);
  const std::string stored = content.substr(kDigitsAt, kDigits);
  if (stored != hex(checksum))  // compared as text: a flipped case bit in a hex letter counts too
    throw Error(damaged(path, "checksum mismatch (stored " + stored + ", computed " + hex(checksum) + " over the whole file)"));
}

// step_<digits>.safetensors
bool is_checkpoint_name(const std::string& name) {
  constexpr std::string_view head = "step_", tail = ".safetensors";
  if (name.size() <= head.size() + tail.size() || !name.starts_with(head) || !name.ends_with(tail)) return false;
  return std::all_of(name.begin() + head.size(), name.end() - tail.size(), [](char c) { return c >= '0' && c <= '9'; });
}

int64_t step_of(const fs::path& checkpoint) {
  return std::stoll(checkpoint.filename().string().substr(5));
}

}  // namespace

const at::Tensor* SafetensorsFile::find(const std::string& name) const {
  for (const auto& tensor : tensors)
    if (tensor.name == name) return &tensor.tensor;
  return nullptr;
}

void save_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                      std::map<std::string, std::string> metadata) {
  std::vector<at::Tensor> contiguous;
  std::ostringstream entries;
  uint64_t offset = 0;
  for (const auto& item : tensors) {
    at::Tensor tensor = item.tensor.detach().to(at::kCPU).contiguous();
    std::string dtype;
    for (const auto& [type, name] : kDtypes)
      if (type == tensor.scalar_type()) dtype = name;
    if (dtype.empty()) throw Error("cannot save tensor " + item.name + ": unsupported dtype");
    const uint64_t bytes = tensor.numel() * tensor.element_size();
    entries << "," << json_quote(item.name) << ":{\"dtype\":\"" << dtype << "\",\"shape\":[";
    for (int64_t d = 0; d < tensor.dim(); ++d) entries << (d ? "," : "") << tensor.size(d);
    entries << "],\"data_offsets\":[" << offset << "," << offset + bytes << "]}";
    offset += bytes;
    contiguous.push_back(tensor);
  }
  // The checksum keys are this writer's own (a caller may pass on metadata it read).
  for (std::string_view key : {kDataChecksumKey, std::string_view("file_checksum"), kSchemeKey}) metadata.erase(std::string(key));
  metadata["producer"] = "pithtrain";
  metadata[std::string(kSchemeKey)] = kScheme;
  std::string header(kHeaderOpening);
  header += kZeroDigits + "\"";
  for (const auto& [key, value] : metadata) header += "," + json_quote(key) + ":" + json_quote(value);
  header += "}" + entries.str() + "}";
  while (header.size() % 8 != 0) header += ' ';  // the data starts 8-byte aligned
  const uint64_t header_size = header.size();
  char length[8];
  std::memcpy(length, &header_size, 8);

  TemporaryFile file(path, 8 + header_size + offset);
  uint64_t checksum = fnv1a(header.data(), header.size(), fnv1a(length, 8, kFnvOffset));
  file.write(length, 8);
  file.write(header.data(), header.size());
  for (const auto& tensor : contiguous) {
    const char* bytes = static_cast<const char*>(tensor.data_ptr());
    const size_t count = tensor.numel() * tensor.element_size();
    for (size_t start = 0; start < count; start += kChunk) {
      const size_t size = std::min(kChunk, count - start);
      checksum = fnv1a(bytes + start, size, checksum);
      file.write(bytes + start, size);
    }
  }
  const std::string digits = hex(checksum);
  file.write_at(kDigitsAt, digits.data(), kDigits);
  file.commit();
}

SafetensorsFile load_safetensors(const std::string& path) {
  const std::string fix = "; it is damaged or not a safetensors file";
  const std::string content = read_whole_file(path);
  if (content.size() < 8) throw Error("'" + path + "' is too short" + fix);
  uint64_t header_size = 0;
  std::memcpy(&header_size, content.data(), 8);
  // Either mark of the whole-file scheme, looked for without trusting the length prefix's value.
  const bool whole_file = content.compare(8, kHeaderOpening.size(), kHeaderOpening) == 0 ||
                          content.substr(8, std::min<uint64_t>(header_size, content.size() - 8)).find(kSchemeMark) != std::string::npos;
  if (whole_file) verify_whole_file(path, content);
  if (header_size > content.size() - 8) throw Error("'" + path + "' has a header larger than the file" + fix);
  JsonValue header;
  try {
    header = parse_json(content.substr(8, header_size), path);
  } catch (const Error& error) {
    throw Error(std::string(error.what()) + fix);
  }
  const size_t data_start = 8 + header_size;
  SafetensorsFile file;
  uint64_t data_checksum = kOldFnvOffset;
  for (const auto& [name, entry] : header.members) {
    if (name == "__metadata__") {
      for (const auto& [key, value] : entry.members) file.metadata[key] = value.text;
      continue;
    }
    const JsonValue* dtype = entry.find("dtype");
    const JsonValue* shape = entry.find("shape");
    const JsonValue* offsets = entry.find("data_offsets");
    if (!dtype || !shape || !offsets || offsets->items.size() != 2) throw Error("'" + path + "': entry " + name + " is incomplete" + fix);
    at::ScalarType type = at::kFloat;
    bool known = false;
    for (const auto& [candidate, label] : kDtypes)
      if (label == dtype->text) type = candidate, known = true;
    if (!known) throw Error("'" + path + "': tensor " + name + " has unsupported dtype " + dtype->text);
    std::vector<int64_t> sizes;
    for (const auto& dim : shape->items) sizes.push_back(static_cast<int64_t>(dim.number));
    uint64_t begin = static_cast<uint64_t>(offsets->items[0].number), end = static_cast<uint64_t>(offsets->items[1].number);
    at::Tensor tensor = at::empty(sizes, at::TensorOptions().dtype(type));
    if (end < begin || data_start + end > content.size() || end - begin != tensor.numel() * tensor.element_size())
      throw Error("'" + path + "': tensor " + name + " lies outside the file (truncated?)" + fix);
    std::memcpy(tensor.data_ptr(), content.data() + data_start + begin, end - begin);
    if (!whole_file) data_checksum = fnv1a(content.data() + data_start + begin, end - begin, data_checksum);
    file.tensors.push_back({name, tensor});
  }
  auto expected = file.metadata.find(std::string(kDataChecksumKey));
  if (!whole_file && expected != file.metadata.end() && expected->second != hex(data_checksum))
    throw Error(damaged(path, "checksum mismatch (stored " + expected->second + ", computed " + hex(data_checksum) +
                                  " over the tensor bytes)"));
  return file;
}

void copy_tensors_by_name(const SafetensorsFile& source, const std::vector<NamedTensor>& targets,
                          const std::string& prefix, const std::string& file,
                          const std::set<std::string>& blocks, int64_t block_index, int64_t block_count,
                          const std::map<std::string, std::vector<int64_t>>& flat_shards, int64_t shard_index,
                          int64_t shard_count) {
  at::NoGradGuard no_grad;
  for (const auto& target : targets) {
    const at::Tensor* stored = source.find(prefix + target.name);
    if (stored == nullptr)
      throw Error("checkpoint '" + file + "' has no tensor '" + prefix + target.name +
                  "': it was written by a different model or plugin set; use a new --out (or run.name) for this config");
    // An expert-parallel block: the file holds the full tensor whatever layout wrote it (resharding).
    at::Tensor source_tensor = *stored;
    std::vector<int64_t> expected = target.tensor.sizes().vec();
    if (auto shard = flat_shards.find(target.name); shard != flat_shards.end()) {
      expected = shard->second;
      if (stored->sizes() == at::IntArrayRef(expected)) {
        const int64_t size = target.tensor.numel();  // s: the shard's elements
        at::Tensor padded = at::zeros({size * shard_count}, stored->options());
        padded.narrow(0, 0, stored->numel()).copy_(stored->reshape(-1));
        source_tensor = padded.narrow(0, shard_index * size, size);
      }
    } else if (blocks.count(target.name) && !expected.empty()) {
      expected[0] *= block_count;
      if (stored->sizes() == at::IntArrayRef(expected))
        source_tensor = stored->narrow(0, block_index * target.tensor.size(0), target.tensor.size(0));
    }
    if (stored->sizes() != at::IntArrayRef(expected))
      throw Error("checkpoint '" + file + "': tensor '" + prefix + target.name + "' has shape " +
                  c10::str(stored->sizes()) + " but the model has " + c10::str(at::IntArrayRef(expected)) +
                  "; use a new --out (or run.name) for this config");
    target.tensor.copy_(source_tensor);
  }
}

std::vector<fs::path> CheckpointFolder::list() const {
  std::vector<fs::path> files;
  std::error_code error;
  for (fs::directory_iterator entry(folder_, error), end; !error && entry != end; entry.increment(error))
    if (is_checkpoint_name(entry->path().filename().string())) files.push_back(entry->path());
  std::sort(files.begin(), files.end(), [](const fs::path& a, const fs::path& b) { return step_of(a) > step_of(b); });
  return files;
}

void CheckpointFolder::remove_unfinished() const {
  std::error_code error;
  for (fs::directory_iterator entry(folder_, error), end; !error && entry != end; entry.increment(error)) {
    const std::string name = entry->path().filename().string();
    if (!name.ends_with(".tmp") || !is_checkpoint_name(name.substr(0, name.size() - 4))) continue;
    std::error_code removed;
    if (fs::remove(entry->path(), removed); removed)
      logger().warn("cannot remove the unfinished checkpoint {}: {}", entry->path().string(), removed.message());
    else
      logger().info("removed {}: an unfinished save of a stopped run", entry->path().string());
  }
}

fs::path CheckpointFolder::save(int64_t step, const std::vector<NamedTensor>& tensors,
                                const std::map<std::string, std::string>& metadata) {
  std::error_code error;
  if (fs::create_directories(folder_, error)) sync_folder(folder_.parent_path(), folder_.string());
  if (error) throw Error("cannot create the checkpoint folder '" + folder_.string() + "': " + describe(error.value()));
  remove_unfinished();  // before writing: their space may be what this save needs
  char name[40];
  std::snprintf(name, sizeof(name), "step_%09lld.safetensors", static_cast<long long>(step));
  const fs::path path = folder_ / name;
  try {
    save_safetensors(path.string(), tensors, metadata);
  } catch (const Error& failure) {
    const auto saved = list();
    throw Error(std::string(failure.what()) + (saved.empty() ? "; there is no earlier checkpoint"
                                                             : "; the newest complete checkpoint is " + saved.front().string() +
                                                                   " (rerunning the same command resumes from it)"));
  }
  // Only now that the new one is in place; never the one just written (a folder may hold a later
  // step from before checkpoint.resume = false).
  int64_t newer = 0;  // checkpoints newer than `file`
  for (const auto& file : list()) {
    if (newer++ < std::max<int64_t>(keep_, 1) || file == path) continue;
    std::error_code removed;
    if (fs::remove(file, removed); removed) logger().warn("cannot remove the old checkpoint {}: {}", file.string(), removed.message());
  }
  return path;
}

std::optional<std::pair<fs::path, SafetensorsFile>> CheckpointFolder::load_latest() const {
  for (const auto& path : list()) {
    try {
      return std::pair{path, load_safetensors(path.string())};
    } catch (const Error& error) {
      logger().error("skipping checkpoint: {}", error.what());
    }
  }
  return std::nullopt;
}

}  // namespace pithtrain
