// Reading and writing one refcount in a refcount block, at any width
// (refcount_order 0..6). Widths below 8 bits are packed LSB-first within each
// byte; 16, 32 and 64 bits are big-endian.
#pragma once

#include <cstdint>

#include "block/endian.h"

namespace uqcow::qcow2 {

inline uint64_t get_refcount_entry(const uint8_t* block, uint64_t index, uint32_t order) {
  switch (order) {
    case 0: return (block[index / 8] >> (index % 8)) & 0x1;
    case 1: return (block[index / 4] >> (2 * (index % 4))) & 0x3;
    case 2: return (block[index / 2] >> (4 * (index % 2))) & 0xf;
    case 3: return block[index];
    case 4: return load_be16(block + index * 2);
    case 5: return load_be32(block + index * 4);
    default: return load_be64(block + index * 8);
  }
}

inline void set_refcount_entry(uint8_t* block, uint64_t index, uint32_t order, uint64_t value) {
  switch (order) {
    case 0: case 1: case 2: {
      uint32_t bits = 1u << order;
      uint32_t per_byte = 8 / bits;
      uint32_t shift = bits * static_cast<uint32_t>(index % per_byte);
      uint8_t mask = static_cast<uint8_t>(((1u << bits) - 1) << shift);
      uint8_t& b = block[index / per_byte];
      b = static_cast<uint8_t>((b & ~mask) | ((value << shift) & mask));
      return;
    }
    case 3: block[index] = static_cast<uint8_t>(value); return;
    case 4: store_be16(block + index * 2, static_cast<uint16_t>(value)); return;
    case 5: store_be32(block + index * 4, static_cast<uint32_t>(value)); return;
    default: store_be64(block + index * 8, value); return;
  }
}

inline uint64_t max_refcount(uint32_t order) {
  return order >= 6 ? UINT64_MAX : (uint64_t{1} << (1u << order)) - 1;
}

}  // namespace uqcow::qcow2
