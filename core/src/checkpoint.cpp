// Safetensors reading and writing, and checkpoint folder management.
#include "checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <sstream>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <spdlog/spdlog.h>

#include "json.h"

namespace pithtrain {
namespace fs = std::filesystem;

namespace {

uint64_t fnv1a(const char* bytes, size_t count, uint64_t hash) {
  for (size_t i = 0; i < count; ++i) hash = (hash ^ static_cast<uint8_t>(bytes[i])) * 1099511628211ull;
  return hash;
}
constexpr uint64_t kFnvOffset = 1469598103934665603ull;

const std::vector<std::pair<at::ScalarType, std::string>> kDtypes = {
    {at::kFloat, "F32"}, {at::kDouble, "F64"}, {at::kBFloat16, "BF16"}, {at::kHalf, "F16"},
    {at::kLong, "I64"},  {at::kInt, "I32"},    {at::kByte, "U8"},       {at::kBool, "BOOL"}};

std::string hex(uint64_t value) {
  char buffer[20];
  std::snprintf(buffer, sizeof(buffer), "%016llx", static_cast<unsigned long long>(value));
  return buffer;
}

void fsync_path(const fs::path& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
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
  uint64_t checksum = kFnvOffset;
  std::ostringstream entries;
  uint64_t offset = 0;
  for (const auto& item : tensors) {
    at::Tensor tensor = item.tensor.detach().to(at::kCPU).contiguous();
    std::string dtype;
    for (const auto& [type, name] : kDtypes)
      if (type == tensor.scalar_type()) dtype = name;
    if (dtype.empty()) throw Error("cannot save tensor " + item.name + ": unsupported dtype");
    uint64_t bytes = tensor.numel() * tensor.element_size();
    checksum = fnv1a(static_cast<const char*>(tensor.data_ptr()), bytes, checksum);
    entries << "," << json_quote(item.name) << ":{\"dtype\":\"" << dtype << "\",\"shape\":[";
    for (int64_t d = 0; d < tensor.dim(); ++d) entries << (d ? "," : "") << tensor.size(d);
    entries << "],\"data_offsets\":[" << offset << "," << offset + bytes << "]}";
    offset += bytes;
    contiguous.push_back(tensor);
  }
  metadata["checksum"] = hex(checksum);
  metadata["producer"] = "pithtrain";
  std::ostringstream header;
  header << "{\"__metadata__\":{";
  bool first = true;
  for (const auto& [key, value] : metadata) header << (first ? "" : ",") << json_quote(key) << ":" << json_quote(value), first = false;
  header << "}" << entries.str() << "}";
  std::string header_text = header.str();
  while (header_text.size() % 8 != 0) header_text += ' ';

  const std::string temporary = path + ".tmp";
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    if (!out) throw Error("cannot write '" + temporary + "': check that the folder exists and is writable");
    uint64_t header_size = header_text.size();
    out.write(reinterpret_cast<const char*>(&header_size), 8);
    out.write(header_text.data(), static_cast<std::streamsize>(header_text.size()));
    for (const auto& tensor : contiguous)
      out.write(static_cast<const char*>(tensor.data_ptr()), static_cast<std::streamsize>(tensor.numel() * tensor.element_size()));
    out.flush();
    if (!out) throw Error("writing '" + temporary + "' failed (disk full?)");
  }
  fsync_path(temporary);
  fs::rename(temporary, path);
  fsync_path(fs::path(path).parent_path().empty() ? fs::path(".") : fs::path(path).parent_path());
}

SafetensorsFile load_safetensors(const std::string& path) {
  const std::string fix = "; it is damaged or not a safetensors file";
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot open '" + path + "'");
  std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (content.size() < 8) throw Error("'" + path + "' is too short" + fix);
  uint64_t header_size = 0;
  std::memcpy(&header_size, content.data(), 8);
  if (header_size > content.size() - 8) throw Error("'" + path + "' has a header larger than the file" + fix);
  JsonValue header = parse_json(content.substr(8, header_size), path);
  const size_t data_start = 8 + header_size;
  SafetensorsFile file;
  uint64_t checksum = kFnvOffset;
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
    checksum = fnv1a(content.data() + data_start + begin, end - begin, checksum);
    file.tensors.push_back({name, tensor});
  }
  auto expected = file.metadata.find("checksum");
  if (expected != file.metadata.end() && expected->second != hex(checksum))
    throw Error("'" + path + "': checksum mismatch (stored " + expected->second + ", computed " + hex(checksum) + ")" + fix);
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
  if (!fs::is_directory(folder_, error)) return files;
  for (const auto& entry : fs::directory_iterator(folder_)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("step_", 0) == 0 && entry.path().extension() == ".safetensors") files.push_back(entry.path());
  }
  std::sort(files.rbegin(), files.rend());  // zero-padded step numbers sort as numbers
  return files;
}

fs::path CheckpointFolder::save(int64_t step, const std::vector<NamedTensor>& tensors,
                                const std::map<std::string, std::string>& metadata) {
  fs::create_directories(folder_);
  char name[40];
  std::snprintf(name, sizeof(name), "step_%09lld.safetensors", static_cast<long long>(step));
  fs::path path = folder_ / name;
  save_safetensors(path.string(), tensors, metadata);
  auto files = list();
  for (size_t i = static_cast<size_t>(std::max<int64_t>(keep_, 1)); i < files.size(); ++i) fs::remove(files[i]);
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
