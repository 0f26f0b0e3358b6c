// Typed access to the on-disk metadata tables: the only code that knows
// where an entry sits in an L2 slice (QEMU's get_l2_entry, get_l2_bitmap,
// set_l2_entry, set_l2_bitmap), and the one decoder/encoder of the tables
// of big-endian 64-bit entries (L1 tables, the refcount table).
#pragma once

#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "engine/result.h"
#include "engine/task.h"
#include "block/endian.h"
#include "qcow2/format.h"
#include "uring/block_device.h"

namespace uqcow::qcow2 {

// A view of the entries of one L2 slice (or whole table) in memory. Entry i
// is 8 bytes (16 with extended L2: the entry, then its subcluster bitmap).
// `Byte` is uint8_t for a slice being changed, const uint8_t otherwise.
template <class Byte>
class BasicL2Slice {
 public:
  BasicL2Slice(Byte* data, const Geometry& geo) : data_(data), extended_(geo.extended_l2) {}

  uint32_t entry_size() const { return extended_ ? 16 : 8; }
  uint64_t entry(uint64_t i) const { return load_be64(at(i)); }
  // The extended-L2 subcluster bitmap (allocated bits low, zero bits high);
  // 0 for an image without extended L2.
  uint64_t bitmap(uint64_t i) const { return extended_ ? load_be64(at(i) + 8) : 0; }

  void set_entry(uint64_t i, uint64_t l2e) requires(!std::is_const_v<Byte>) { store_be64(at(i), l2e); }
  // Ignored without extended L2 (there is no bitmap to set).
  void set_bitmap(uint64_t i, uint64_t bitmap) requires(!std::is_const_v<Byte>) {
    if (extended_) store_be64(at(i) + 8, bitmap);
  }
  void set(uint64_t i, uint64_t l2e, uint64_t bitmap) requires(!std::is_const_v<Byte>) {
    set_entry(i, l2e);
    set_bitmap(i, bitmap);
  }

 private:
  Byte* at(uint64_t i) const { return data_ + i * entry_size(); }

  Byte* data_;
  bool extended_;
};
using L2Slice = BasicL2Slice<uint8_t>;
using ConstL2Slice = BasicL2Slice<const uint8_t>;

// A table of big-endian 64-bit entries (L1 table, refcount table) decoded
// from / encoded to its on-disk bytes. encode_table pads with zeros to
// `bytes` (at least 8 * entries.size()).
std::vector<uint64_t> decode_table(std::span<const uint8_t> raw);
std::vector<uint8_t> encode_table(std::span<const uint64_t> entries, uint64_t bytes);
inline std::vector<uint8_t> encode_table(std::span<const uint64_t> entries) {
  return encode_table(entries, entries.size() * 8);
}

// Reads `entries` entries of such a table at `offset` of `file`. The caller
// bounds `entries` (the header and snapshot parsers do: 32 MiB L1 tables,
// 8 MiB refcount tables).
Task<Result<std::vector<uint64_t>>> read_table(BlockDevice& file, uint64_t offset, uint64_t entries);

}  // namespace uqcow::qcow2
