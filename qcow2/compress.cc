#include "qcow2/compress.h"

#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

namespace uqcow::qcow2 {
namespace {

constexpr int kZlibWindowBits = -12;  // raw deflate, 4 KiB window (QEMU)

Status zlib_inflate(std::span<const uint8_t> in, std::span<uint8_t> out) {
  z_stream strm{};
  if (inflateInit2(&strm, kZlibWindowBits) != Z_OK) {
    return Error(ENOMEM, "zlib: inflateInit2 failed");
  }
  strm.next_in = const_cast<Bytef*>(in.data());
  strm.avail_in = static_cast<uInt>(in.size());
  strm.next_out = out.data();
  strm.avail_out = static_cast<uInt>(out.size());
  int ret = inflate(&strm, Z_FINISH);
  bool full = strm.avail_out == 0;
  inflateEnd(&strm);
  // Z_BUF_ERROR with a full output is success: the stored stream is padded.
  if ((ret == Z_STREAM_END || ret == Z_BUF_ERROR) && full) return Status();
  return Error(EIO, "compressed cluster does not inflate (zlib: " +
                        std::string(ret == Z_STREAM_END ? "stream ends early" : "corrupt data") + ")");
}

Status zstd_decompress(std::span<const uint8_t> in, std::span<uint8_t> out) {
  ZSTD_DCtx* dctx = ZSTD_createDCtx();
  if (!dctx) return Error(ENOMEM, "zstd: ZSTD_createDCtx failed");
  ZSTD_inBuffer input{in.data(), in.size(), 0};
  ZSTD_outBuffer output{out.data(), out.size(), 0};
  Status status;
  // The compressed stream may consist of several frames; stop once the
  // cluster is full, ignoring the padding behind it.
  while (output.pos < output.size) {
    size_t ret = ZSTD_decompressStream(dctx, &output, &input);
    if (ZSTD_isError(ret)) {
      status = Error(EIO, std::string("compressed cluster does not decompress (zstd: ") +
                              ZSTD_getErrorName(ret) + ")");
      break;
    }
    if (output.pos < output.size && input.pos == input.size) {
      status = Error(EIO, "compressed cluster does not decompress (zstd: stream ends early)");
      break;
    }
  }
  ZSTD_freeDCtx(dctx);
  return status;
}

}  // namespace

Status decompress_cluster(CompressionType type, std::span<const uint8_t> in,
                          std::span<uint8_t> out) {
  return type == CompressionType::kZstd ? zstd_decompress(in, out) : zlib_inflate(in, out);
}

Result<size_t> compress_cluster(CompressionType type, std::span<const uint8_t> in,
                                std::span<uint8_t> out) {
  if (type == CompressionType::kZstd) {
    size_t ret = ZSTD_compress(out.data(), out.size(), in.data(), in.size(), ZSTD_CLEVEL_DEFAULT);
    if (ZSTD_isError(ret)) {
      if (ZSTD_getErrorCode(ret) == ZSTD_error_dstSize_tooSmall) return size_t{0};
      return Error(EIO, std::string("zstd compression: ") + ZSTD_getErrorName(ret));
    }
    return ret < out.size() ? ret : size_t{0};
  }
  z_stream strm{};
  if (deflateInit2(&strm, Z_DEFAULT_COMPRESSION, Z_DEFLATED, kZlibWindowBits, 9,
                   Z_DEFAULT_STRATEGY) != Z_OK) {
    return Error(ENOMEM, "zlib: deflateInit2 failed");
  }
  strm.next_in = const_cast<Bytef*>(in.data());
  strm.avail_in = static_cast<uInt>(in.size());
  strm.next_out = out.data();
  strm.avail_out = static_cast<uInt>(out.size());
  int ret = deflate(&strm, Z_FINISH);
  size_t produced = out.size() - strm.avail_out;
  deflateEnd(&strm);
  if (ret == Z_STREAM_END && produced < out.size()) return produced;
  if (ret == Z_OK || ret == Z_BUF_ERROR || ret == Z_STREAM_END) return size_t{0};  // incompressible
  return Error(EIO, "zlib compression failed");
}

}  // namespace uqcow::qcow2
