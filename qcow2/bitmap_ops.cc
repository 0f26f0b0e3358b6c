// Qcow2Image's persistent dirty bitmaps: the read-write open's part of
// QEMU's qcow2_load_dirty_bitmaps (extension kept or dropped, IN_USE set),
// and qemu-img bitmap's actions over PersistentBitmaps (bitmaps.h).
#include "qcow2/header_io.h"
#include "qcow2/image.h"

namespace uqcow::qcow2 {

Task<Status> Qcow2Image::prepare_bitmaps() {
  // Autoclear bits this implementation does not maintain must be cleared
  // when the image is opened for writing (docs/interop/qcow2.txt); the
  // bitmaps bit stays while the extension is there.
  uint64_t autoclear = header_.autoclear_features & (kAutoclearDataFileRaw | kAutoclearBitmaps);
  if (!header_.bitmaps) autoclear &= ~kAutoclearBitmaps;
  if (header_.bitmaps && !(autoclear & kAutoclearBitmaps)) {
    // A program lacking bitmap support wrote the image (or it is v2): the
    // bitmaps are invalid, and QEMU drops the extension (their clusters
    // leak until a repair).
    Header h = header_;
    h.bitmaps.reset();
    h.autoclear_features = header_.version >= 3 ? autoclear : 0;
    UQ_CO_TRY(co_await write_header(*file_, h));
    UQ_CO_TRY(co_await file_->co_flush());
    header_.bitmaps.reset();
    header_.autoclear_features = h.autoclear_features;
  } else if (header_.version >= 3 && autoclear != header_.autoclear_features) {
    UQ_CO_TRY(co_await write_header_fields(*file_, {kOffAutoclear, autoclear}));
    UQ_CO_TRY(co_await file_->co_flush());
    header_.autoclear_features = autoclear;
  }
  // Before the first write can reach the disk: from now on a crash leaves
  // every bitmap inconsistent rather than silently missing writes.
  co_return co_await bitmaps_->mark_in_use();
}

Task<Status> Qcow2Image::set_bitmaps_in_use() {
  auto guard = co_await lock_.scoped_lock();
  // Another writer may have done it while we waited.
  if (bitmaps_->ready_for_writes()) co_return Status();
  co_return co_await bitmaps_->mark_in_use();
}

Result<const DirtyBitmap*> Qcow2Image::dirty_bitmap(const std::string& name) const {
  if (!bitmaps_) return Error(ENOENT, "Dirty bitmap '" + name + "' not found");
  return bitmaps_->find(name);
}

std::vector<BitmapInfo> Qcow2Image::bitmap_list() const {
  return bitmaps_ ? bitmaps_->list() : std::vector<BitmapInfo>{};
}

namespace {

Status writable_bitmaps(bool read_only, const std::string& file) {
  if (read_only) return Error(EROFS, file + " is open read-only: bitmaps cannot change");
  return Status();
}

}  // namespace

Status Qcow2Image::bitmap_add(const std::string& name, uint64_t granularity, bool enabled) {
  UQ_TRY(writable_bitmaps(options_.read_only, file_->name()));
  return bitmaps_->add(name, granularity, enabled);
}

Status Qcow2Image::bitmap_remove(const std::string& name) {
  UQ_TRY(writable_bitmaps(options_.read_only, file_->name()));
  return bitmaps_->remove(name);
}

Status Qcow2Image::bitmap_clear(const std::string& name) {
  UQ_TRY(writable_bitmaps(options_.read_only, file_->name()));
  return bitmaps_->clear(name);
}

Status Qcow2Image::bitmap_set_enabled(const std::string& name, bool enabled) {
  UQ_TRY(writable_bitmaps(options_.read_only, file_->name()));
  return bitmaps_->set_enabled(name, enabled);
}

Status Qcow2Image::bitmap_merge(const std::string& name, const DirtyBitmap& src) {
  UQ_TRY(writable_bitmaps(options_.read_only, file_->name()));
  // QEMU's bdrv_merge_dirty_bitmap refuses bitmaps of other disks' sizes.
  if (src.size() != size_) {
    return Error(EINVAL, "Bitmaps are of different sizes (destination size is " + std::to_string(size_) +
                             ", source size is " + std::to_string(src.size()) + ") and can't be merged");
  }
  return bitmaps_->merge(name, src);
}

}  // namespace uqcow::qcow2
