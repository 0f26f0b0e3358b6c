#include "qcow2/create.h"

#include "block/options.h"
#include "qcow2/image.h"
#include "qcow2/new_image.h"
#include "uring/raw_file.h"

namespace uqcow::qcow2 {

Task<Status> create_image(const std::string& path, const CreateOptions& o) {
  UQ_CO_TRY(co_await write_new_image(path, o));
  // QEMU's qcow2_co_create: a raw data file must read as the disk whether
  // or not the metadata is looked at, so its L2 tables map every cluster
  // 1:1 from the start (preallocation=metadata at least).
  const Preallocation prealloc =
      o.data_file_raw && o.preallocation == Preallocation::kOff ? Preallocation::kMetadata : o.preallocation;
  if (prealloc == Preallocation::kOff) co_return Status();

  // Opened as open_disk() (block/open.h) opens a qcow2 image, less the
  // backing file, which preallocation does not read.
  OpenOptions open_options;
  open_options.read_only = false;
  open_options.no_backing = true;
  UQ_CO_ASSIGN_OR_RETURN(auto file, RawFile::open(path, {.read_only = false,
                                                         .cache = open_options.cache,
                                                         .lock = lock_perms(open_options, LockedFile::kQcow2Image)}));
  UQ_CO_ASSIGN_OR_RETURN(auto img, co_await Qcow2Image::open(std::move(file), open_options, nullptr));
  Status s = co_await img->preallocate(prealloc);
  Status c = co_await img->close();
  co_return s.ok() ? c : s;
}

}  // namespace uqcow::qcow2
