// DirtyBitmap: which parts of a disk have changed, one bit per granule
// (QEMU's BdrvDirtyBitmap without the HBitmap levels).
//
// A granule is `granularity` bytes (a power of two, at least 512); granule
// i covers [i * granularity, (i + 1) * granularity) of the disk, the last
// one maybe cut short by the disk's end.
//
// Hot path contract: set() neither allocates nor suspends; it is what every
// write, write-zeroes, discard and compressed write calls for each enabled
// bitmap. Only create(), resize() and merge_from() allocate.
//
// Serialised form (docs/interop/qcow2.txt, "Bitmaps"; NBD exports read the
// same bits): byte k, bit j (least significant first) is granule 8k + j.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "engine/result.h"

namespace uqcow {

class DirtyBitmap {
 public:
  // A clean bitmap of a `disk_size`-byte disk. EINVAL for a granularity
  // that is not a power of two in [512, 2^31].
  static Result<DirtyBitmap> create(uint64_t disk_size, uint64_t granularity);

  uint64_t size() const { return size_; }
  uint64_t granularity() const { return uint64_t{1} << granularity_bits_; }
  uint32_t granularity_bits() const { return granularity_bits_; }
  uint64_t granules() const { return granules_; }

  // Marks every granule that [offset, offset + len) touches; the range is
  // clamped to the disk. No allocation.
  void set(uint64_t offset, uint64_t len) {
    if (len == 0 || offset >= size_) return;
    const uint64_t first = offset >> granularity_bits_;
    const uint64_t last = (std::min(offset + len, size_) - 1) >> granularity_bits_;
    if (first == last) {
      words_[first >> 6] |= uint64_t{1} << (first & 63);
    } else {
      set_granules(first, last + 1);
    }
  }
  // Clears the granules lying wholly inside [offset, offset + len) (a
  // granule cut by the disk's end counts as whole).
  void reset(uint64_t offset, uint64_t len);
  void clear();
  void set_all();

  bool dirty_at(uint64_t offset) const {
    const uint64_t g = offset >> granularity_bits_;
    return (words_[g >> 6] >> (g & 63)) & 1;
  }
  // The bytes from `offset` (< size()) with the state of the granule at
  // `offset`, at most `max_len`; `*dirty` gets that state. Runs stop at
  // granule boundaries, never inside one.
  uint64_t run_length(uint64_t offset, uint64_t max_len, bool* dirty) const;
  uint64_t dirty_granules() const;
  // Bytes of the disk inside dirty granules (qemu's "count").
  uint64_t dirty_bytes() const;

  // Marks dirty every granule of this bitmap that overlaps a dirty granule
  // of `src` (any granularity; `src` may be shorter or longer). No
  // allocation.
  void merge_from(const DirtyBitmap& src);
  // A new disk size: granules past the old end start clean; those past the
  // new end are dropped. May allocate.
  void resize(uint64_t new_size);

  // Serialised bytes needed for the whole bitmap: ceil(granules / 8).
  uint64_t serialized_bytes() const { return (granules_ + 7) / 8; }
  // Copies serialised bytes [byte_offset, byte_offset + out.size()) into
  // `out`; bytes past serialized_bytes() come out as zero.
  void serialize(uint64_t byte_offset, std::span<uint8_t> out) const;
  // Sets the bits of serialised bytes [byte_offset, + in.size()) from `in`
  // (ORed in; bits past the last granule are ignored).
  void deserialize(uint64_t byte_offset, std::span<const uint8_t> in);
  // Marks every granule of serialised bytes [byte_offset, + n) dirty (an
  // all-ones bitmap-table entry).
  void set_serialized_range(uint64_t byte_offset, uint64_t n);
  // Whether any bit of serialised bytes [byte_offset, + n) is set.
  bool any_in_serialized_range(uint64_t byte_offset, uint64_t n) const;

  bool operator==(const DirtyBitmap& o) const {
    return size_ == o.size_ && granularity_bits_ == o.granularity_bits_ && words_ == o.words_;
  }

 private:
  DirtyBitmap(uint64_t size, uint32_t granularity_bits);
  void set_granules(uint64_t begin, uint64_t end);
  void clear_granules(uint64_t begin, uint64_t end);
  bool granule(uint64_t g) const { return (words_[g >> 6] >> (g & 63)) & 1; }
  // Zeroes the bits of the last word past granules_ (they must stay clear:
  // counting and serialising rely on it).
  void trim_tail();

  uint64_t size_ = 0;
  uint32_t granularity_bits_ = 16;
  uint64_t granules_ = 0;
  std::vector<uint64_t> words_;  // bit g % 64 of word g / 64 is granule g
};

}  // namespace uqcow
