// Reading the header from an image file, and the one writer of header
// fields in place.
//
// Outside image creation and changes of the extensions (which write the
// whole first cluster: write_header), every header field update goes
// through write_header_fields(): it writes one run of
// adjacent fields, named by their offsets in header.h, in one write. Fields
// that must change together (an L1 table's size and offset, the refcount
// table's offset and size, the snapshot count and table offset) are adjacent
// in the header and lie inside one 512-byte sector, so a crash leaves either
// the old pair or the new one, never half of each.
#pragma once

#include <cstdint>

#include "engine/result.h"
#include "engine/task.h"
#include "qcow2/header.h"
#include "uring/block_device.h"

namespace uqcow::qcow2 {

// Reads and validates the header of the qcow2 image in `file`: the start of
// the file, then the whole first cluster once cluster_bits is known. Errors
// name the offending field, as parse_header does, prefixed with the file.
Task<Result<Header>> read_image_header(BlockDevice& file, HeaderUse use);

// One field of an in-place header update: its offset (kOff*) and new value,
// stored big-endian with the field's width (4 or 8 bytes).
struct HeaderFieldValue {
  HeaderOffset field;
  uint64_t value;
};

// Writes one field, or two adjacent ones (`second` right after `first`), in
// one write at the first one's offset (no flush). EINVAL for fields that are not
// writable in place (magic, version, cluster_bits, crypt_method,
// refcount_order, header_length, compression_type), not adjacent, or a value
// that does not fit a 4-byte field. The in-memory Header is the caller's to
// update once the write (and whatever flush its ordering needs) succeeded.
Task<Status> write_header_fields(BlockDevice& file, HeaderFieldValue first);
Task<Status> write_header_fields(BlockDevice& file, HeaderFieldValue first, HeaderFieldValue second);

// Rewrites the whole first cluster from `h` (header, extensions, backing
// file name), as QEMU's qcow2_update_header: what a change of the
// extensions needs (the bitmaps extension). No flush. Not atomic: callers
// order it so that either header is valid (see bitmaps.h).
Task<Status> write_header(BlockDevice& file, const Header& h);

// The width in bytes of a field writable in place, 0 for the others.
uint32_t header_field_width(HeaderOffset field);

}  // namespace uqcow::qcow2
