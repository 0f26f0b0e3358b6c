#include "nbd/meta_context.h"

#include <algorithm>

namespace uqcow::nbd {
namespace {

// Strips `prefix` from the front of `s`; false (and `s` unchanged) if `s`
// does not start with it.
bool strip_prefix(std::string_view& s, std::string_view prefix) {
  if (!s.starts_with(prefix)) return false;
  s.remove_prefix(prefix.size());
  return true;
}

// "qemu:dirty-bitmap:" + leaf: on LIST an empty leaf selects every bitmap;
// otherwise the first exported bitmap of that name.
void match_bitmap(std::string_view leaf, bool list, const OfferedContexts& offered, MetaContexts& selected) {
  if (leaf.empty()) {
    if (list) std::fill(selected.bitmaps.begin(), selected.bitmaps.end(), true);
    return;
  }
  for (size_t i = 0; i < offered.bitmaps.size(); ++i) {
    if (offered.bitmaps[i].name == leaf) {
      selected.bitmaps[i] = true;
      return;
    }
  }
}

}  // namespace

size_t MetaContexts::count() const {
  return size_t{base_allocation} + size_t{allocation_depth} +
         static_cast<size_t>(std::count(bitmaps.begin(), bitmaps.end(), true));
}

MetaContexts all_contexts(const OfferedContexts& offered) {
  return MetaContexts{.base_allocation = true,
                      .allocation_depth = offered.allocation_depth,
                      .bitmaps = std::vector<bool>(offered.bitmaps.size(), true)};
}

void match_query(std::string_view query, bool list, const OfferedContexts& offered, MetaContexts& selected) {
  selected.bitmaps.resize(offered.bitmaps.size(), false);
  if (strip_prefix(query, "base:")) {
    if (query == "allocation" || (list && query.empty())) selected.base_allocation = true;
    return;
  }
  if (!strip_prefix(query, "qemu:")) return;  // an unknown namespace
  if (query.empty()) {
    if (list) {  // every qemu: context, and base:allocation only if asked for too
      selected.allocation_depth |= offered.allocation_depth;
      std::fill(selected.bitmaps.begin(), selected.bitmaps.end(), true);
    }
    return;
  }
  if (query == "allocation-depth") {
    selected.allocation_depth |= offered.allocation_depth;
    return;
  }
  if (strip_prefix(query, "dirty-bitmap:")) match_bitmap(query, list, offered, selected);
}

Result<ExportedBitmap> find_export_bitmap(const Disk& disk, const std::string& name) {
  for (const Disk* layer = &disk; layer != nullptr; layer = layer->backing()) {
    Result<const DirtyBitmap*> found = layer->dirty_bitmap(name);
    if (found.ok()) return ExportedBitmap{name, *found};
    if (found.error().code() == EINVAL) {
      return Error(EINVAL, "Bitmap '" + name + "' is inconsistent and cannot be used");
    }
    if (found.error().code() != ENOENT) return std::move(found).error();
  }
  return Error(ENOENT, "Bitmap '" + name + "' is not found");
}

}  // namespace uqcow::nbd
