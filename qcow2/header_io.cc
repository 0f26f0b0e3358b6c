#include "qcow2/header_io.h"

#include <algorithm>
#include <vector>

#include "block/endian.h"

namespace uqcow::qcow2 {
namespace {
constexpr uint64_t kFirstReadBytes = 64 << 10;
}  // namespace

Task<Result<Header>> read_image_header(BlockDevice& file, HeaderUse use) {
  UQ_CO_ASSIGN_OR_RETURN(const uint64_t len, file.length());
  std::vector<uint8_t> first(std::min(len, kFirstReadBytes));
  auto bytes = [&] { return std::span<std::byte>(reinterpret_cast<std::byte*>(first.data()), first.size()); };
  UQ_CO_TRY(co_await file.co_read(0, bytes()));
  if (first.size() >= kOffClusterBits + 4 && load_be32(first.data() + kOffMagic) == kMagic) {
    // Unvalidated here: only used to size a read that parse_header then
    // validates, within the limits it accepts.
    const uint32_t bits = load_be32(first.data() + kOffClusterBits);
    if (bits >= kMinClusterBits && bits <= kMaxClusterBits && (uint64_t{1} << bits) > first.size() &&
        len > first.size()) {
      first.resize(std::min(len, uint64_t{1} << bits));
      UQ_CO_TRY(co_await file.co_read(0, bytes()));
    }
  }
  auto header = parse_header(first, use);
  if (!header.ok()) co_return std::move(header).error().with_context(file.name());
  co_return std::move(header).value();
}

uint32_t header_field_width(HeaderOffset field) {
  switch (field) {
    case kOffBackingFileOffset:
    case kOffSize:
    case kOffL1TableOffset:
    case kOffRefcountTableOffset:
    case kOffSnapshotsOffset:
    case kOffIncompatible:
    case kOffCompatible:
    case kOffAutoclear:
      return 8;
    case kOffBackingFileSize:
    case kOffL1Size:
    case kOffRefcountTableClusters:
    case kOffNbSnapshots:
      return 4;
    default:
      return 0;
  }
}

namespace {

// The fields of one update, encoded in one buffer.
struct EncodedFields {
  uint32_t offset = 0;
  uint32_t length = 0;
  uint8_t bytes[32];
};

Result<EncodedFields> encode_fields(std::span<const HeaderFieldValue> fields) {
  EncodedFields e;
  e.offset = static_cast<uint32_t>(fields.front().field);
  for (const HeaderFieldValue& f : fields) {
    const uint32_t width = header_field_width(f.field);
    const std::string name = "header field at offset " + std::to_string(f.field);
    if (width == 0) return Error(EINVAL, name + " is not writable in place");
    if (f.field != e.offset + e.length || e.length + width > sizeof e.bytes) {
      return Error(EINVAL, name + ": fields written together must be adjacent and in order");
    }
    if (width == 4 && f.value > UINT32_MAX) {
      return Error(EINVAL, name + ": " + std::to_string(f.value) + " does not fit 32 bits");
    }
    if (width == 4) {
      store_be32(e.bytes + e.length, static_cast<uint32_t>(f.value));
    } else {
      store_be64(e.bytes + e.length, f.value);
    }
    e.length += width;
  }
  return e;
}

Task<Status> write_encoded(BlockDevice& file, Result<EncodedFields> e) {
  if (!e.ok()) co_return std::move(e).error();
  if (e->length == 0) co_return Status();
  co_return co_await file.co_write(
      e->offset, std::span<const std::byte>(reinterpret_cast<const std::byte*>(e->bytes), e->length));
}

}  // namespace

Task<Status> write_header_fields(BlockDevice& file, HeaderFieldValue first) {
  return write_encoded(file, encode_fields(std::span<const HeaderFieldValue>(&first, 1)));
}

Task<Status> write_header_fields(BlockDevice& file, HeaderFieldValue first, HeaderFieldValue second) {
  const HeaderFieldValue both[] = {first, second};
  return write_encoded(file, encode_fields(both));
}

Task<Status> write_header(BlockDevice& file, const Header& h) {
  UQ_CO_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, serialize_header(h));
  co_return co_await file.co_write(
      0, std::span<const std::byte>(reinterpret_cast<const std::byte*>(bytes.data()), bytes.size()));
}

}  // namespace uqcow::qcow2
