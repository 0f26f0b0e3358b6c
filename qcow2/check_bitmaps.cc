// The checker's view of the persistent bitmaps: the directory read and
// validated as QEMU's bitmap_list_load does, and -r all's removal of the
// bitmaps a crash left in use.
#include <algorithm>

#include "qcow2/bitmap_directory.h"
#include "qcow2/repair.h"

namespace uqcow::qcow2::check_internal {

Task<Result<std::vector<BitmapDirEntry>>> load_bitmap_directory(CheckedImage& img) {
  const auto& ext = img.header.bitmaps;
  // QEMU ignores the bitmaps while the autoclear bit says a program without
  // bitmap support has written the image.
  if (!ext || !(img.header.autoclear_features & kAutoclearBitmaps) || ext->nb_bitmaps == 0) {
    co_return std::vector<BitmapDirEntry>{};
  }
  if (ext->directory_size == 0 || ext->directory_size > kMaxBitmapDirectoryBytes ||
      ext->directory_offset > img.file_length || ext->directory_size > img.file_length - ext->directory_offset) {
    co_return Error(EINVAL, "bitmap_directory_size " + std::to_string(ext->directory_size) + " at offset " +
                                std::to_string(ext->directory_offset) + " runs past the end of the file");
  }
  std::vector<uint8_t> dir(ext->directory_size);
  UQ_CO_TRY(co_await img.file.co_read(ext->directory_offset,
                                      {reinterpret_cast<std::byte*>(dir.data()), dir.size()}));
  co_return parse_bitmap_directory(dir, ext->nb_bitmaps, img.cluster_size(), img.header.size);
}

// Not QEMU's: qemu-img check -r all keeps a bitmap left in use, which no
// tool can use again (QEMU only lets one remove it). Removing it here frees
// its clusters in the same repair (the refcount pass then finds them
// leaked). The directory shrinks in place while the autoclear bit is clear,
// so a crash in between leaves the bitmaps ignored, never half-written.
Task<Status> remove_inconsistent_bitmaps(CheckedImage& img, CheckResult& res) {
  auto entries = co_await load_bitmap_directory(img);
  if (!entries.ok()) co_return Status();  // the check reports it
  std::vector<BitmapDirEntry> keep;
  for (auto& e : *entries) {
    if (e.in_use()) {
      note(res, "Repairing bitmap '%s': left in use (inconsistent), removed", e.name.c_str());
    } else {
      keep.push_back(std::move(e));
    }
  }
  if (keep.size() == entries->size()) co_return Status();
  Header h = img.header;
  h.autoclear_features &= ~kAutoclearBitmaps;
  UQ_CO_TRY(co_await write_header_fields(img.file, {kOffAutoclear, h.autoclear_features}));
  UQ_CO_TRY(co_await img.file.co_flush());
  if (keep.empty()) {
    h.bitmaps.reset();
  } else {
    UQ_CO_ASSIGN_OR_RETURN(std::vector<uint8_t> dir, serialize_bitmap_directory(keep));
    UQ_CO_TRY(co_await img.file.co_write(h.bitmaps->directory_offset,
                                         {reinterpret_cast<const std::byte*>(dir.data()), dir.size()}));
    UQ_CO_TRY(co_await img.file.co_flush());
    h.bitmaps->nb_bitmaps = static_cast<uint32_t>(keep.size());
    h.bitmaps->directory_size = dir.size();
    h.autoclear_features |= kAutoclearBitmaps;
  }
  UQ_CO_TRY(co_await write_header(img.file, h));
  UQ_CO_TRY(co_await img.file.co_flush());
  img.header = std::move(h);
  co_return Status();
}

}  // namespace uqcow::qcow2::check_internal
