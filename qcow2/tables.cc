#include "qcow2/tables.h"

#include <algorithm>

namespace uqcow::qcow2 {

std::vector<uint64_t> decode_table(std::span<const uint8_t> raw) {
  std::vector<uint64_t> table(raw.size() / 8);
  for (size_t i = 0; i < table.size(); ++i) table[i] = load_be64(&raw[i * 8]);
  return table;
}

std::vector<uint8_t> encode_table(std::span<const uint64_t> entries, uint64_t bytes) {
  std::vector<uint8_t> raw(std::max<uint64_t>(bytes, entries.size() * 8), 0);
  for (size_t i = 0; i < entries.size(); ++i) store_be64(&raw[i * 8], entries[i]);
  return raw;
}

Task<Result<std::vector<uint64_t>>> read_table(BlockDevice& file, uint64_t offset, uint64_t entries) {
  std::vector<uint8_t> raw(entries * 8);
  if (!raw.empty()) {
    UQ_CO_TRY(co_await file.co_read(offset, std::span<std::byte>(reinterpret_cast<std::byte*>(raw.data()), raw.size())));
  }
  co_return decode_table(raw);
}

}  // namespace uqcow::qcow2
