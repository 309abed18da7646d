// The safetensors format with PithTrain's whole-file checksum: crash-safe writes (temporary file, fsync,
// rename), whole-file reads, and reading and writing one tensor at a time for files too large to hold.
#include "safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <sstream>
#include <string_view>
#include <tuple>
#include <utility>

#include <ATen/ATen.h>

#include "json.h"
#include "pithtrain/error.h"

namespace pithtrain {
namespace fs = std::filesystem;

std::string describe_error(int error) {
  if (error == ENOSPC || error == EDQUOT) return std::string("disk full (") + std::strerror(error) + ")";
  return std::strerror(error);
}

// Flushes a folder's entries (a rename, a new file) to disk. Some file systems cannot sync a folder
// (EINVAL); there the rename is as durable as that file system makes it.
void sync_folder(const fs::path& folder, const std::string& saving) {
  const fs::path target = folder.empty() ? fs::path(".") : folder;
  const int fd = ::open(target.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    const int error = errno;
    throw Error("cannot save '" + saving + "': cannot open its folder to flush it: " + describe_error(error));
  }
  const int result = ::fsync(fd), error = errno;
  ::close(fd);
  if (result != 0 && error != EINVAL)
    throw Error("cannot save '" + saving + "': flushing its folder '" + target.string() + "' to disk failed: " +
                describe_error(error) + "; the file is written but may not survive a power loss");
}

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

std::string damaged(const std::string& path, const std::string& what) {
  return "'" + path + "' is damaged: " + what + "; restore it from a copy or delete it";
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
    throw Error("cannot save '" + final_ + "': " + describe_error(error) + " while " + doing + " '" + path_ + "'" + rest +
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

constexpr uint64_t kMaxHeader = uint64_t{100} << 20;  // the largest header the safetensors format allows
const std::string kFix = "; it is damaged or not a safetensors file";

std::string dtype_name(at::ScalarType type) {
  for (const auto& [candidate, name] : kDtypes)
    if (candidate == type) return name;
  return "";
}

uint64_t byte_size(const TensorEntry& entry) {
  uint64_t count = c10::elementSize(entry.dtype);
  for (int64_t size : entry.shape) count *= static_cast<uint64_t>(size);
  return count;
}

// The metadata and the tensor entries of a header `text` (the bytes after the length prefix), each
// entry checked against the file's size. load_safetensors and SafetensorsReader share its messages.
std::pair<std::map<std::string, std::string>, std::vector<TensorEntry>> parse_header(const std::string& path, const std::string& text,
                                                                                     uint64_t file_size) {
  JsonValue header;
  try {
    header = parse_json(text, path);
  } catch (const Error& error) {
    throw Error(std::string(error.what()) + kFix);
  }
  const uint64_t data_start = 8 + text.size();
  std::map<std::string, std::string> metadata;
  std::vector<TensorEntry> tensors;
  for (const auto& [name, entry] : header.members) {
    if (name == "__metadata__") {
      for (const auto& [key, value] : entry.members) metadata[key] = value.text;
      continue;
    }
    const JsonValue* dtype = entry.find("dtype");
    const JsonValue* shape = entry.find("shape");
    const JsonValue* offsets = entry.find("data_offsets");
    if (!dtype || !shape || !offsets || offsets->items.size() != 2) throw Error("'" + path + "': entry " + name + " is incomplete" + kFix);
    TensorEntry tensor{name};
    bool known = false;
    for (const auto& [candidate, label] : kDtypes)
      if (label == dtype->text) tensor.dtype = candidate, known = true;
    if (!known) throw Error("'" + path + "': tensor " + name + " has unsupported dtype " + dtype->text);
    bool negative = false;
    for (const auto& dim : shape->items) tensor.shape.push_back(static_cast<int64_t>(dim.number)), negative |= dim.number < 0;
    const uint64_t begin = static_cast<uint64_t>(offsets->items[0].number), end = static_cast<uint64_t>(offsets->items[1].number);
    if (negative || end < begin || data_start + end > file_size || end - begin != byte_size(tensor))
      throw Error("'" + path + "': tensor " + name + " lies outside the file (truncated?)" + kFix);
    tensor.begin = data_start + begin, tensor.end = data_start + end;
    tensors.push_back(std::move(tensor));
  }
  return {std::move(metadata), std::move(tensors)};
}

// COUNT bytes at OFFSET of an open file into `into`; a file that ends first was cut short while being read.
void read_at(int fd, const std::string& path, uint64_t offset, char* into, uint64_t count) {
  while (count > 0) {
    const ssize_t got = ::pread(fd, into, std::min<uint64_t>(count, uint64_t{1} << 30), static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      const int error = errno;
      throw Error("cannot read '" + path + "': " + std::strerror(error));
    }
    if (got == 0) throw Error("'" + path + "' ended at byte " + std::to_string(offset) + " while being read (truncated?)" + kFix);
    into += got, count -= static_cast<uint64_t>(got), offset += static_cast<uint64_t>(got);
  }
}

// FNV-1a over bytes [begin, end) of an open file, read in kChunk pieces.
uint64_t hash_range(int fd, const std::string& path, uint64_t begin, uint64_t end, uint64_t hash) {
  std::string buffer(static_cast<size_t>(std::min<uint64_t>(kChunk, end - begin)), '\0');
  for (uint64_t at = begin; at < end; at += buffer.size()) {
    const uint64_t size = std::min<uint64_t>(buffer.size(), end - at);
    read_at(fd, path, at, buffer.data(), size);
    hash = fnv1a(buffer.data(), size, hash);
  }
  return hash;
}

// verify_whole_file for a file read in pieces.
void verify_whole_file(int fd, const std::string& path, uint64_t size) {
  std::string head(kDigitsAt + kDigits, '\0');
  if (size >= head.size()) read_at(fd, path, 0, head.data(), head.size());
  if (size < head.size() || head.compare(8, kHeaderOpening.size(), kHeaderOpening) != 0)
    throw Error(damaged(path, "its header does not open with the file_checksum field that its checksum_scheme promises"));
  uint64_t checksum = fnv1a(head.data(), kDigitsAt, kFnvOffset);
  checksum = fnv1a(kZeroDigits.data(), kDigits, checksum);
  checksum = hash_range(fd, path, head.size(), size, checksum);
  const std::string stored = head.substr(kDigitsAt, kDigits);
  if (stored != hex(checksum))
    throw Error(damaged(path, "checksum mismatch (stored " + stored + ", computed " + hex(checksum) + " over the whole file)"));
}

}  // namespace

const at::Tensor* SafetensorsFile::find(const std::string& name) const {
  for (const auto& tensor : tensors)
    if (tensor.name == name) return &tensor.tensor;
  return nullptr;
}

void save_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                      std::map<std::string, std::string> metadata) {
  std::vector<TensorEntry> layout;
  for (const auto& item : tensors) layout.push_back({item.name, item.tensor.scalar_type(), item.tensor.sizes().vec()});
  SafetensorsWriter writer(path, layout, std::move(metadata));
  for (const auto& item : tensors) writer.write(item.name, item.tensor);
  writer.commit();
}

SafetensorsFile load_safetensors(const std::string& path) {
  const std::string content = read_whole_file(path);
  if (content.size() < 8) throw Error("'" + path + "' is too short" + kFix);
  uint64_t header_size = 0;
  std::memcpy(&header_size, content.data(), 8);
  // Either mark of the whole-file scheme, looked for without trusting the length prefix's value.
  const bool whole_file = content.compare(8, kHeaderOpening.size(), kHeaderOpening) == 0 ||
                          content.substr(8, std::min<uint64_t>(header_size, content.size() - 8)).find(kSchemeMark) != std::string::npos;
  if (whole_file) verify_whole_file(path, content);
  if (header_size > content.size() - 8) throw Error("'" + path + "' has a header larger than the file" + kFix);
  auto [metadata, entries] = parse_header(path, content.substr(8, header_size), content.size());
  SafetensorsFile file;
  file.metadata = std::move(metadata);
  uint64_t data_checksum = kOldFnvOffset;
  for (const auto& entry : entries) {
    at::Tensor tensor = at::empty(entry.shape, at::TensorOptions().dtype(entry.dtype));
    std::memcpy(tensor.data_ptr(), content.data() + entry.begin, entry.end - entry.begin);
    if (!whole_file) data_checksum = fnv1a(content.data() + entry.begin, entry.end - entry.begin, data_checksum);
    file.tensors.push_back({entry.name, tensor});
  }
  auto expected = file.metadata.find(std::string(kDataChecksumKey));
  if (!whole_file && expected != file.metadata.end() && expected->second != hex(data_checksum))
    throw Error(damaged(path, "checksum mismatch (stored " + expected->second + ", computed " + hex(data_checksum) +
                                  " over the tensor bytes)"));
  return file;
}

SafetensorsReader::SafetensorsReader(std::string path) : path_(std::move(path)) {
  fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) {
    const int error = errno;
    throw Error("cannot open '" + path_ + "': " + std::strerror(error));
  }
  try {
    struct stat info {};
    if (::fstat(fd_, &info) != 0) {
      const int error = errno;
      throw Error("cannot read '" + path_ + "': " + std::strerror(error));
    }
    const uint64_t size = static_cast<uint64_t>(info.st_size);
    if (size < 8) throw Error("'" + path_ + "' is too short" + kFix);
    uint64_t header_size = 0;
    read_at(fd_, path_, 0, reinterpret_cast<char*>(&header_size), 8);
    // The header (or as much as the file and the format's limit allow), and at least the checksum's opening:
    // the two marks of the whole-file scheme are looked for as load_safetensors does.
    const uint64_t claimed = std::min({header_size, size - 8, kMaxHeader});
    std::string text(static_cast<size_t>(std::min(size - 8, std::max<uint64_t>(claimed, kDigitsAt + kDigits - 8))), '\0');
    read_at(fd_, path_, 8, text.data(), text.size());
    const bool whole_file = text.compare(0, kHeaderOpening.size(), kHeaderOpening) == 0 ||
                            std::string_view(text).substr(0, claimed).find(kSchemeMark) != std::string_view::npos;
    if (whole_file) verify_whole_file(fd_, path_, size);
    if (header_size > size - 8) throw Error("'" + path_ + "' has a header larger than the file" + kFix);
    if (header_size > kMaxHeader)
      throw Error("'" + path_ + "' has a header of " + std::to_string(header_size) + " bytes, more than the 100 MB safetensors allows" + kFix);
    text.resize(header_size);
    std::tie(metadata_, tensors_) = parse_header(path_, text, size);
    auto expected = metadata_.find(std::string(kDataChecksumKey));
    if (!whole_file && expected != metadata_.end()) {  // the older scheme: the tensor bytes in header order
      uint64_t data_checksum = kOldFnvOffset;
      for (const auto& entry : tensors_) data_checksum = hash_range(fd_, path_, entry.begin, entry.end, data_checksum);
      if (expected->second != hex(data_checksum))
        throw Error(damaged(path_, "checksum mismatch (stored " + expected->second + ", computed " + hex(data_checksum) +
                                       " over the tensor bytes)"));
    }
  } catch (...) {
    ::close(fd_);
    throw;
  }
  for (size_t i = 0; i < tensors_.size(); ++i) index_[tensors_[i].name] = i;
}

SafetensorsReader::SafetensorsReader(SafetensorsReader&& other) noexcept
    : path_(std::move(other.path_)), fd_(std::exchange(other.fd_, -1)), metadata_(std::move(other.metadata_)),
      tensors_(std::move(other.tensors_)), index_(std::move(other.index_)) {}

SafetensorsReader::~SafetensorsReader() {
  if (fd_ >= 0) ::close(fd_);
}

const TensorEntry* SafetensorsReader::find(const std::string& name) const {
  auto found = index_.find(name);
  return found == index_.end() ? nullptr : &tensors_[found->second];
}

at::Tensor SafetensorsReader::read(const TensorEntry& entry) const {
  at::Tensor tensor = at::empty(entry.shape, at::TensorOptions().dtype(entry.dtype));
  read_into(entry, tensor);
  return tensor;
}

void SafetensorsReader::read_into(const TensorEntry& entry, const at::Tensor& out) const {
  if (!out.is_cpu() || !out.is_contiguous() || out.scalar_type() != entry.dtype ||
      static_cast<uint64_t>(out.numel()) * out.element_size() != entry.end - entry.begin)
    throw Error("cannot read tensor " + entry.name + " of '" + path_ + "' into a " + c10::toString(out.scalar_type()) + " " +
                c10::str(out.sizes()) + " tensor: it is " + c10::toString(entry.dtype) + " " + c10::str(at::IntArrayRef(entry.shape)));
  if (entry.end > entry.begin) read_at(fd_, path_, entry.begin, static_cast<char*>(out.data_ptr()), entry.end - entry.begin);
}

struct SafetensorsWriter::State {
  std::string path;
  std::vector<TensorEntry> layout;
  size_t next = 0;  // the layout's next tensor to write
  uint64_t checksum = kFnvOffset;
  std::unique_ptr<TemporaryFile> file;
};

SafetensorsWriter::SafetensorsWriter(const std::string& path, const std::vector<TensorEntry>& layout,
                                     std::map<std::string, std::string> metadata)
    : state_(std::make_unique<State>()) {
  state_->path = path, state_->layout = layout;
  std::ostringstream entries;
  uint64_t offset = 0;
  for (const auto& item : layout) {
    const std::string dtype = dtype_name(item.dtype);
    if (dtype.empty()) throw Error("cannot save tensor " + item.name + ": unsupported dtype");
    const uint64_t bytes = byte_size(item);
    entries << "," << json_quote(item.name) << ":{\"dtype\":\"" << dtype << "\",\"shape\":[";
    for (size_t d = 0; d < item.shape.size(); ++d) entries << (d ? "," : "") << item.shape[d];
    entries << "],\"data_offsets\":[" << offset << "," << offset + bytes << "]}";
    offset += bytes;
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

  state_->file = std::make_unique<TemporaryFile>(path, 8 + header_size + offset);
  state_->checksum = fnv1a(header.data(), header.size(), fnv1a(length, 8, kFnvOffset));
  state_->file->write(length, 8);
  state_->file->write(header.data(), header.size());
}

SafetensorsWriter::~SafetensorsWriter() = default;

void SafetensorsWriter::write(const std::string& name, const at::Tensor& tensor) {
  State& state = *state_;
  const std::string planned = state.next < state.layout.size() ? state.layout[state.next].name : "none (all are written)";
  if (name != planned)
    throw Error("cannot save '" + state.path + "': tensor " + name + " came where the header has " + planned);
  const TensorEntry& entry = state.layout[state.next];
  at::Tensor contiguous = tensor.detach().to(at::kCPU).contiguous();
  if (contiguous.scalar_type() != entry.dtype || contiguous.sizes() != at::IntArrayRef(entry.shape))
    throw Error("cannot save '" + state.path + "': tensor " + name + " is " + c10::toString(contiguous.scalar_type()) + " " +
                c10::str(contiguous.sizes()) + " but the header has " + c10::toString(entry.dtype) + " " +
                c10::str(at::IntArrayRef(entry.shape)));
  const char* bytes = static_cast<const char*>(contiguous.data_ptr());
  const size_t count = contiguous.numel() * contiguous.element_size();
  for (size_t start = 0; start < count; start += kChunk) {
    const size_t size = std::min(kChunk, count - start);
    state.checksum = fnv1a(bytes + start, size, state.checksum);
    state.file->write(bytes + start, size);
  }
  ++state.next;
}

void SafetensorsWriter::commit() {
  State& state = *state_;
  if (state.next != state.layout.size())
    throw Error("cannot save '" + state.path + "': " + std::to_string(state.next) + " of the " + std::to_string(state.layout.size()) +
                " tensors its header names were written");
  const std::string digits = hex(state.checksum);
  state.file->write_at(kDigitsAt, digits.data(), kDigits);
  state.file->commit();
}

}  // namespace pithtrain
