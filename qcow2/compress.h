// Compressed clusters: zlib raw deflate (QEMU's 4 KiB window, -12 bits) and
// zstd, as QEMU's qcow2-threads.c writes and reads them.
#pragma once

#include <cstdint>
#include <span>

#include "engine/result.h"
#include "qcow2/format.h"

namespace uqcow::qcow2 {

// Inflates `in` until `out` is full. The stored stream may be followed by
// slack (sector padding); only a stream that ends before filling `out` or is
// malformed is an error (EIO, message names the compression type).
Status decompress_cluster(CompressionType type, std::span<const uint8_t> in,
                          std::span<uint8_t> out);

// Compresses `in` into `out`. Returns the compressed size, or 0 when the
// result would not be smaller than out.size() (the caller then writes the
// cluster uncompressed, as QEMU does).
Result<size_t> compress_cluster(CompressionType type, std::span<const uint8_t> in,
                                std::span<uint8_t> out);

}  // namespace uqcow::qcow2
