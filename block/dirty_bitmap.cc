#include "block/dirty_bitmap.h"

#include <algorithm>
#include <bit>
#include <string>

namespace uqcow {

namespace {

// Bits [b, e) of a word (0 <= b < e <= 64).
constexpr uint64_t bit_range(uint64_t b, uint64_t e) {
  const uint64_t hi = e == 64 ? ~uint64_t{0} : (uint64_t{1} << e) - 1;
  return hi & ~((uint64_t{1} << b) - 1);
}

}  // namespace

Result<DirtyBitmap> DirtyBitmap::create(uint64_t disk_size, uint64_t granularity) {
  if (granularity < 512 || granularity > (uint64_t{1} << 31) || !std::has_single_bit(granularity)) {
    return Error(EINVAL, "granularity " + std::to_string(granularity) +
                             " is not a power of two between 512 and 2147483648");
  }
  return DirtyBitmap(disk_size, static_cast<uint32_t>(std::countr_zero(granularity)));
}

DirtyBitmap::DirtyBitmap(uint64_t size, uint32_t granularity_bits) : granularity_bits_(granularity_bits) {
  resize(size);
}

void DirtyBitmap::resize(uint64_t new_size) {
  size_ = new_size;
  granules_ = (new_size + granularity() - 1) >> granularity_bits_;
  words_.resize((granules_ + 63) / 64, 0);
  trim_tail();
}

void DirtyBitmap::trim_tail() {
  if (granules_ % 64 != 0) words_.back() &= bit_range(0, granules_ % 64);
}

void DirtyBitmap::set_granules(uint64_t begin, uint64_t end) {
  while (begin < end) {
    const uint64_t w = begin >> 6;
    const uint64_t stop = std::min(end, (w + 1) << 6);
    words_[w] |= bit_range(begin & 63, stop - (w << 6));
    begin = stop;
  }
}

void DirtyBitmap::clear_granules(uint64_t begin, uint64_t end) {
  while (begin < end) {
    const uint64_t w = begin >> 6;
    const uint64_t stop = std::min(end, (w + 1) << 6);
    words_[w] &= ~bit_range(begin & 63, stop - (w << 6));
    begin = stop;
  }
}

void DirtyBitmap::reset(uint64_t offset, uint64_t len) {
  if (len == 0 || offset >= size_) return;
  const uint64_t end = std::min(offset + len, size_);
  const uint64_t first = (offset + granularity() - 1) >> granularity_bits_;
  // The granule cut by the disk's end ends at size_.
  const uint64_t last_end = end == size_ ? granules_ : end >> granularity_bits_;
  if (first < last_end) clear_granules(first, last_end);
}

void DirtyBitmap::clear() { std::fill(words_.begin(), words_.end(), 0); }

void DirtyBitmap::set_all() {
  std::fill(words_.begin(), words_.end(), ~uint64_t{0});
  trim_tail();
}

uint64_t DirtyBitmap::run_length(uint64_t offset, uint64_t max_len, bool* dirty) const {
  const uint64_t end = std::min(size_, offset + std::min(max_len, size_ - offset));
  uint64_t g = offset >> granularity_bits_;
  const bool state = granule(g);
  *dirty = state;
  const uint64_t end_granule = (end + granularity() - 1) >> granularity_bits_;
  ++g;
  while (g < end_granule) {
    const uint64_t w = g >> 6;
    uint64_t bits = state ? ~words_[w] : words_[w];
    bits &= ~((uint64_t{1} << (g & 63)) - 1);  // from g on
    if (bits != 0) {
      g = std::min((w << 6) + static_cast<uint64_t>(std::countr_zero(bits)), end_granule);
      break;
    }
    g = (w + 1) << 6;
  }
  g = std::min(g, end_granule);
  return std::min(end, g << granularity_bits_) - offset;
}

uint64_t DirtyBitmap::dirty_granules() const {
  uint64_t n = 0;
  for (uint64_t w : words_) n += static_cast<uint64_t>(std::popcount(w));
  return n;
}

uint64_t DirtyBitmap::dirty_bytes() const {
  uint64_t n = dirty_granules() << granularity_bits_;
  // The last granule may be cut short by the disk's end.
  if (granules_ > 0 && granule(granules_ - 1)) n -= (granules_ << granularity_bits_) - size_;
  return n;
}

void DirtyBitmap::merge_from(const DirtyBitmap& src) {
  if (src.granularity_bits_ == granularity_bits_) {
    const size_t n = std::min(words_.size(), src.words_.size());
    for (size_t i = 0; i < n; ++i) words_[i] |= src.words_[i];
    trim_tail();
    return;
  }
  // Different granularities: walk src's dirty runs.
  uint64_t off = 0;
  const uint64_t end = std::min(size_, src.size_);
  while (off < end) {
    bool d = false;
    const uint64_t n = src.run_length(off, end - off, &d);
    if (d) set(off, n);
    off += n;
  }
}

void DirtyBitmap::serialize(uint64_t byte_offset, std::span<uint8_t> out) const {
  const uint64_t total = words_.size() * 8;
  for (size_t i = 0; i < out.size(); ++i) {
    const uint64_t k = byte_offset + i;
    out[i] = k < total ? static_cast<uint8_t>(words_[k / 8] >> (8 * (k % 8))) : 0;
  }
}

void DirtyBitmap::deserialize(uint64_t byte_offset, std::span<const uint8_t> in) {
  const uint64_t total = words_.size() * 8;
  for (size_t i = 0; i < in.size(); ++i) {
    const uint64_t k = byte_offset + i;
    if (k >= total) break;
    words_[k / 8] |= uint64_t{in[i]} << (8 * (k % 8));
  }
  trim_tail();
}

void DirtyBitmap::set_serialized_range(uint64_t byte_offset, uint64_t n) {
  const uint64_t begin = std::min(byte_offset * 8, granules_);
  const uint64_t end = std::min((byte_offset + n) * 8, granules_);
  if (begin < end) set_granules(begin, end);
}

bool DirtyBitmap::any_in_serialized_range(uint64_t byte_offset, uint64_t n) const {
  uint64_t g = std::min(byte_offset * 8, granules_);
  const uint64_t end = std::min((byte_offset + n) * 8, granules_);
  while (g < end) {
    const uint64_t w = g >> 6;
    const uint64_t stop = std::min(end, (w + 1) << 6);
    if (words_[w] & bit_range(g & 63, stop - (w << 6))) return true;
    g = stop;
  }
  return false;
}

}  // namespace uqcow
