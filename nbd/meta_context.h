// Metadata contexts (proto.md, "Metadata querying"): the ones an export
// offers beyond base:allocation (`serve -A`, `serve -B NAME`), and which of
// them a client's LIST_META_CONTEXT / SET_META_CONTEXT queries select. The
// matching is qemu-nbd 7.2's (nbd/server.c: nbd_meta_base_query,
// nbd_meta_qemu_query), query for query.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "block/disk.h"
#include "block/dirty_bitmap.h"
#include "engine/result.h"

namespace uqcow::nbd {

// A persistent dirty bitmap exported as qemu:dirty-bitmap:NAME. The Disk
// layer that owns it keeps it alive while the disk is open and marks it on
// every write; sessions read it live, request by request.
struct ExportedBitmap {
  std::string name;
  const DirtyBitmap* bitmap = nullptr;
};

// What an export offers besides base:allocation (always offered).
struct OfferedContexts {
  bool allocation_depth = false;        // qemu:allocation-depth
  std::vector<ExportedBitmap> bitmaps;  // in export order: bitmap i has id kDirtyBitmapId + i
};

// A set of contexts: those a SET_META_CONTEXT selected, or those a
// LIST_META_CONTEXT answers with. Replies (META_CONTEXT, BLOCK_STATUS
// chunks) go in this order: base:allocation, qemu:allocation-depth, then
// the bitmaps in export order.
struct MetaContexts {
  bool base_allocation = false;
  bool allocation_depth = false;
  std::vector<bool> bitmaps;  // empty (none), or one flag per OfferedContexts::bitmaps entry

  size_t count() const;
  bool bitmap(size_t i) const { return i < bitmaps.size() && bitmaps[i]; }
};

// Every context `offered` holds (a LIST without queries).
MetaContexts all_contexts(const OfferedContexts& offered);

// Adds to `selected` what one query selects. An exact context name selects
// that context if it is offered. On LIST only, a namespace or prefix with an
// empty leaf selects everything under it: "base:" base:allocation, "qemu:"
// every qemu context offered, "qemu:dirty-bitmap:" every bitmap. Anything
// else (an unknown namespace or name, an empty leaf on SET) selects nothing
// and is no error. With several exported bitmaps of one name, the first.
void match_query(std::string_view query, bool list, const OfferedContexts& offered, MetaContexts& selected);

// The bitmap `name` to export with `serve -B NAME`: looked up in `disk`,
// then down its backing chain, as qemu-nbd looks it up. Errors use
// qemu-nbd's wording: ENOENT "Bitmap 'NAME' is not found", EINVAL "Bitmap
// 'NAME' is inconsistent and cannot be used" (left in use by a crash).
Result<ExportedBitmap> find_export_bitmap(const Disk& disk, const std::string& name);

}  // namespace uqcow::nbd
