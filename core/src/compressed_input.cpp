// Streaming decompression for `pithtrain data build` (compressed_input.h): zlib's inflate for gzip
// (several members, as pigz and `cat a.gz b.gz` write, included) and libzstd's streaming decoder.
#include "compressed_input.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include <zlib.h>
#include <zstd.h>

#include "pithtrain/error.h"

namespace pithtrain {
namespace fs = std::filesystem;

std::string compression_of(const fs::path& file) {
  const std::string extension = file.extension().string();
  if (extension == ".gz") return "gzip";
  if (extension == ".zst") return "zstd";
  if (extension == ".parquet")
    throw Error("'" + file.string() + "' is Parquet: convert it first with the offline step "
                "`python scripts/parquet_to_jsonl.py --out FILE.jsonl.gz " + file.string() + "` (docs/data.md, \"Parquet\")");
  if (extension == ".xz" || extension == ".bz2" || extension == ".zip")
    throw Error("'" + file.string() + "': " + extension.substr(1) + " compression is not read; recompress it as .zst or .gz "
                "(e.g. `xz -dc FILE | zstd -o FILE.zst`), or decompress it");
  return "";
}

fs::path without_compression(const fs::path& file) {
  const std::string extension = file.extension().string();
  return extension == ".gz" || extension == ".zst" ? file.parent_path() / file.stem() : file;
}

struct InputFile::Impl {
  fs::path path;
  std::string kind;  // compression_of(path)
  std::FILE* file = nullptr;
  std::vector<char> input = std::vector<char>(1 << 20);
  size_t input_position = 0, input_size = 0;
  bool end_of_file = false;
  uint64_t disk_bytes = 0;
  z_stream gzip{};
  bool gzip_ready = false, member_done = false;
  ZSTD_DStream* zstd = nullptr;
  bool frame_done = false;  // false until a first frame is complete: an empty .zst is truncated

  uint64_t offset() const { return disk_bytes - (input_size - input_position); }
  std::string checker() const { return kind == "gzip" ? "gzip -t " : "zstd -t "; }

  [[noreturn]] void corrupt(const std::string& what) const {
    throw Error("'" + path.string() + "': corrupt " + kind + " data (" + what + ") near compressed byte " + std::to_string(offset()) +
                "; the file is damaged: `" + checker() + path.string() + "` confirms it; fetch or compress it again");
  }
  [[noreturn]] void truncated() const {
    throw Error("'" + path.string() + "': the " + kind + " data ends early (truncated after " + std::to_string(disk_bytes) +
                " bytes, or not " + kind + " at all); `" + checker() + path.string() + "` confirms it; fetch or compress it again");
  }

  void refill() {
    input_position = 0;
    input_size = std::fread(input.data(), 1, input.size(), file);
    if (input_size == 0) {
      if (std::ferror(file)) throw Error("cannot read '" + path.string() + "' (" + std::strerror(errno) + ")");
      end_of_file = true;
    }
    disk_bytes += input_size;
  }

  // One decompression step into `out`: the bytes produced (0 is no progress yet); `finished` at the end.
  size_t gzip_step(char* out, size_t capacity, bool& finished) {
    if (member_done) {
      if (input_position == input_size) return finished = end_of_file, 0;
      inflateReset(&gzip);  // another member follows
      member_done = false;
    }
    gzip.next_in = reinterpret_cast<Bytef*>(input.data() + input_position);
    gzip.avail_in = static_cast<uInt>(input_size - input_position);
    gzip.next_out = reinterpret_cast<Bytef*>(out);
    gzip.avail_out = static_cast<uInt>(capacity);
    const int status = inflate(&gzip, Z_NO_FLUSH);
    input_position = input_size - gzip.avail_in;
    const size_t produced = capacity - gzip.avail_out;
    if (status == Z_STREAM_END) member_done = true;
    else if (status == Z_DATA_ERROR || status == Z_NEED_DICT) corrupt(gzip.msg ? gzip.msg : "bad data");
    else if (status == Z_MEM_ERROR) throw Error("'" + path.string() + "': out of memory while decompressing");
    else if (status == Z_BUF_ERROR && produced == 0 && input_position == input_size && end_of_file) truncated();
    return produced;
  }

  size_t zstd_step(char* out, size_t capacity, bool& finished) {
    ZSTD_inBuffer in{input.data() + input_position, input_size - input_position, 0};
    ZSTD_outBuffer output{out, capacity, 0};
    const size_t status = ZSTD_decompressStream(zstd, &output, &in);
    input_position += in.pos;
    if (ZSTD_isError(status)) corrupt(ZSTD_getErrorName(status));
    // 0: a frame is complete and flushed; another may follow. A call that moved nothing says nothing new
    // (after a frame, the decoder already asks for the next one's header).
    if (in.pos > 0 || output.pos > 0) frame_done = status == 0;
    if (output.pos == 0 && in.pos == 0 && input_position == input_size && end_of_file) {
      if (!frame_done) truncated();
      finished = true;
    }
    return output.pos;
  }
};

InputFile::InputFile(const fs::path& path) : impl_(std::make_unique<Impl>()) {
  impl_->path = path;
  impl_->kind = compression_of(path);
  impl_->file = std::fopen(path.c_str(), "rb");
  if (impl_->file == nullptr) throw Error("cannot read '" + path.string() + "' (" + std::strerror(errno) + ")");
  if (impl_->kind == "gzip") {
    if (inflateInit2(&impl_->gzip, 16 + MAX_WBITS) != Z_OK) throw Error("zlib could not start for '" + path.string() + "'");  // 16: gzip framing
    impl_->gzip_ready = true;
  } else if (impl_->kind == "zstd") {
    impl_->zstd = ZSTD_createDStream();
    if (impl_->zstd == nullptr || ZSTD_isError(ZSTD_initDStream(impl_->zstd)))
      throw Error("libzstd could not start for '" + path.string() + "'");
  }
}

InputFile::~InputFile() {
  if (impl_->gzip_ready) inflateEnd(&impl_->gzip);
  if (impl_->zstd != nullptr) ZSTD_freeDStream(impl_->zstd);
  if (impl_->file != nullptr) std::fclose(impl_->file);
}

uint64_t InputFile::disk_bytes_read() const { return impl_->disk_bytes; }

size_t InputFile::read(char* buffer, size_t capacity) {
  Impl& in = *impl_;
  if (in.kind.empty()) {
    const size_t count = std::fread(buffer, 1, capacity, in.file);
    if (count == 0 && std::ferror(in.file)) throw Error("cannot read '" + in.path.string() + "' (" + std::strerror(errno) + ")");
    in.disk_bytes += count;
    return count;
  }
  // Each pass refills the input, produces output, ends, or throws: the loop always moves on.
  while (true) {
    if (in.input_position == in.input_size && !in.end_of_file) in.refill();
    bool finished = false;
    const size_t produced = in.kind == "gzip" ? in.gzip_step(buffer, capacity, finished) : in.zstd_step(buffer, capacity, finished);
    if (produced > 0) return produced;
    if (finished) return 0;
  }
}

}  // namespace pithtrain
