// TensorBoard event files (tensorboard.h): TFRecord framing and the few protobuf fields of Event, Summary
// and Summary.Value encoded by hand, so a run needs neither TensorFlow nor a protobuf library.
#include "tensorboard.h"

#include <unistd.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>

#include <spdlog/spdlog.h>

#include "pithtrain/error.h"
#include "pithtrain/plugin.h"

namespace pithtrain {
namespace fs = std::filesystem;

uint32_t crc32c(const uint8_t* bytes, size_t count) {
  static const auto table = [] {
    std::array<uint32_t, 256> entries{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t value = i;
      for (int bit = 0; bit < 8; ++bit) value = (value & 1) ? 0x82F63B78u ^ (value >> 1) : value >> 1;  // reflected Castagnoli
      entries[i] = value;
    }
    return entries;
  }();
  uint32_t crc = 0xFFFFFFFFu;
  for (size_t i = 0; i < count; ++i) crc = table[(crc ^ bytes[i]) & 0xFF] ^ (crc >> 8);
  return crc ^ 0xFFFFFFFFu;
}

uint32_t masked_crc32c(const uint8_t* bytes, size_t count) {
  const uint32_t crc = crc32c(bytes, count);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

namespace {

// Protobuf wire format: a field key is (number << 3 | wire type); 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32.
void put_varint(std::string& out, uint64_t value) {
  while (value >= 0x80) out += static_cast<char>((value & 0x7F) | 0x80), value >>= 7;
  out += static_cast<char>(value);
}
void put_fixed(std::string& out, uint64_t bits, int bytes) {  // little-endian, as protobuf and TFRecord want
  for (int i = 0; i < bytes; ++i) out += static_cast<char>((bits >> (8 * i)) & 0xFF);
}
void put_bytes_field(std::string& out, int field, const std::string& bytes) {
  put_varint(out, static_cast<uint64_t>(field) << 3 | 2);
  put_varint(out, bytes.size());
  out += bytes;
}
uint64_t read_fixed(const uint8_t* bytes, int count) {
  uint64_t value = 0;
  for (int i = 0; i < count; ++i) value |= static_cast<uint64_t>(bytes[i]) << (8 * i);
  return value;
}

// Event{wall_time = 1 (double), step = 2 (int64), file_version = 3 (string), summary = 5 (Summary)}.
std::string encode_event(double wall_time, int64_t step, const std::string& file_version, const std::string& summary) {
  std::string event;
  uint64_t bits;
  std::memcpy(&bits, &wall_time, 8);
  event += '\x09';  // field 1, fixed64
  put_fixed(event, bits, 8);
  if (step != 0) event += '\x10', put_varint(event, static_cast<uint64_t>(step));  // field 2, varint
  if (!file_version.empty()) put_bytes_field(event, 3, file_version);
  if (!summary.empty()) put_bytes_field(event, 5, summary);
  return event;
}

// Summary{value = 1 (repeated Value{tag = 1 (string), simple_value = 2 (float)})}.
std::string encode_summary(const std::vector<std::pair<std::string, double>>& scalars) {
  std::string summary;
  for (const auto& [tag, number] : scalars) {
    std::string value;
    put_bytes_field(value, 1, tag);
    const float single = static_cast<float>(number);
    uint32_t bits;
    std::memcpy(&bits, &single, 4);
    value += '\x15';  // field 2, fixed32
    put_fixed(value, bits, 4);
    put_bytes_field(summary, 1, value);
  }
  return summary;
}

bool read_varint(const std::string& data, size_t& position, uint64_t& value) {
  value = 0;
  for (int shift = 0; shift < 64 && position < data.size(); shift += 7) {
    const auto byte = static_cast<uint8_t>(data[position++]);
    value |= static_cast<uint64_t>(byte & 0x7F) << shift;
    if ((byte & 0x80) == 0) return true;
  }
  return false;
}

// The wall time of each step with scalars in an event file this writer wrote, so a rewrite keeps the
// times TensorBoard's relative and wall-time axes show. Stops quietly at a record cut short by a kill.
void read_wall_times(const fs::path& file, std::map<int64_t, double>& times) {
  std::ifstream in(file, std::ios::binary);
  uint8_t header[12], footer[4];
  while (in.read(reinterpret_cast<char*>(header), 12)) {
    const uint64_t length = read_fixed(header, 8);
    if (masked_crc32c(header, 8) != read_fixed(header + 8, 4) || length > (1u << 30)) return;
    std::string data(length, '\0');
    if (!in.read(data.data(), static_cast<std::streamsize>(length)) || !in.read(reinterpret_cast<char*>(footer), 4)) return;
    if (masked_crc32c(reinterpret_cast<const uint8_t*>(data.data()), length) != read_fixed(footer, 4)) return;
    double wall_time = 0;
    int64_t step = 0;
    bool has_summary = false;
    for (size_t position = 0; position < data.size();) {
      uint64_t key, value;
      if (!read_varint(data, position, key)) return;
      const uint64_t wire = key & 7, field = key >> 3;
      if (wire == 0) {
        if (!read_varint(data, position, value)) return;
        if (field == 2) step = static_cast<int64_t>(value);
      } else if (wire == 1 || wire == 5) {
        const size_t size = wire == 1 ? 8 : 4;
        if (position + size > data.size()) return;
        value = read_fixed(reinterpret_cast<const uint8_t*>(data.data()) + position, static_cast<int>(size));
        if (field == 1 && wire == 1) std::memcpy(&wall_time, &value, 8);
        position += size;
      } else if (wire == 2) {
        if (!read_varint(data, position, value) || value > data.size() - position) return;
        has_summary = has_summary || field == 5;
        position += value;
      } else {
        return;  // not an event this writer wrote
      }
    }
    if (has_summary) times[step] = wall_time;
  }
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void flatten(const JsonValue& value, const std::string& path, std::vector<std::pair<std::string, double>>& out) {
  if (value.type == JsonValue::Type::Number) {
    out.emplace_back(path, value.number);
  } else if (value.type == JsonValue::Type::Object) {
    for (const auto& [key, member] : value.members)
      if (key != "moe_layer") flatten(member, path + "/" + key, out);  // the layer's index is in the tag already
  } else if (value.type == JsonValue::Type::Array) {
    bool numbers_only = true;
    for (const auto& item : value.items) numbers_only = numbers_only && item.type == JsonValue::Type::Number;
    if (numbers_only) return;
    for (size_t index = 0; index < value.items.size(); ++index) flatten(value.items[index], path + "/" + std::to_string(index), out);
  }
}

}  // namespace

std::vector<std::pair<std::string, double>> metrics_scalars(const JsonValue& record) {
  std::vector<std::pair<std::string, double>> scalars;
  for (const auto& [key, member] : record.members)
    if (key != "step") flatten(member, key, scalars);
  return scalars;
}

TensorBoardWriter::TensorBoardWriter(const fs::path& folder, const std::vector<std::string>& kept_metrics) {
  std::error_code error;
  fs::create_directories(folder, error);
  if (error) throw Error("cannot create '" + folder.string() + "' (" + error.message() + "); set metrics.tensorboard = false to run without it");
  std::map<int64_t, double> times;
  std::vector<fs::path> old_files;
  for (const auto& entry : fs::directory_iterator(folder))
    if (entry.path().filename().string().find("tfevents") != std::string::npos) {
      old_files.push_back(entry.path());
      read_wall_times(entry.path(), times);
    }
  // A new name per start (seconds since the epoch, so names sort by time): a TensorBoard left running
  // moves on to it, where a file replaced under the same name would keep it reading the deleted one.
  const double now = now_seconds();
  char host[256] = "host";
  ::gethostname(host, sizeof(host) - 1);
  path_ = folder / fmt::format("events.out.tfevents.{:010d}.{}.pithtrain", static_cast<int64_t>(now), host);
  // Written under a name TensorBoard does not read ("tfevents" is what it looks for), then renamed.
  const fs::path temporary = folder / "rewriting.tmp";
  out_.open(temporary, std::ios::binary | std::ios::trunc);
  if (!out_) throw Error("cannot write '" + temporary.string() + "'; set metrics.tensorboard = false to run without it");
  write_record(encode_event(now, 0, "brain.Event:2", ""));
  for (const auto& line : kept_metrics) {
    try {
      const JsonValue record = parse_json(line, path_.string());
      const JsonValue* step = record.find("step");
      if (step == nullptr || step->type != JsonValue::Type::Number) continue;
      const auto index = static_cast<int64_t>(step->number);
      write_event(index, times.count(index) ? times[index] : now, line);
    } catch (const Error& failure) {  // a line metrics.jsonl keeps but cannot be read: the rest still go in
      logger().warn("tensorboard: skipping a metrics.jsonl line: {}", failure.what());
    }
  }
  out_.flush();
  if (!out_) throw Error("writing '" + temporary.string() + "' failed (disk full?); set metrics.tensorboard = false to run without it");
  fs::rename(temporary, path_);  // the open stream follows the file to its new name
  for (const auto& old_file : old_files)
    if (old_file != path_) fs::remove(old_file, error);
}

void TensorBoardWriter::write(int64_t step, const std::string& metrics_line) {
  write_event(step, now_seconds(), metrics_line);
  out_.flush();
  if (!out_) throw Error("writing '" + path_.string() + "' failed (disk full?); the run's checkpoints are unaffected");
}

void TensorBoardWriter::write_event(int64_t step, double wall_time, const std::string& metrics_line) {
  write_record(encode_event(wall_time, step, "", encode_summary(metrics_scalars(parse_json(metrics_line, path_.string())))));
}

void TensorBoardWriter::write_record(const std::string& event) {
  // TFRecord: uint64 length, masked CRC-32C of those 8 bytes, the data, masked CRC-32C of the data.
  std::string record;
  put_fixed(record, event.size(), 8);
  put_fixed(record, masked_crc32c(reinterpret_cast<const uint8_t*>(record.data()), 8), 4);
  record += event;
  put_fixed(record, masked_crc32c(reinterpret_cast<const uint8_t*>(event.data()), event.size()), 4);
  out_.write(record.data(), static_cast<std::streamsize>(record.size()));
}

}  // namespace pithtrain
