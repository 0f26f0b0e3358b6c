// Preallocation: of a freshly created image (qemu-img create -o
// preallocation=metadata|falloc|full), and of the area a resize adds to an
// image whose data file is raw. Member functions of Qcow2Image.
#include <algorithm>
#include <vector>

#include "block/endian.h"
#include "qcow2/create.h"
#include "qcow2/image.h"
#include "qcow2/tables.h"

namespace uqcow::qcow2 {

Task<Status> Qcow2Image::preallocate_metadata(uint64_t start, uint64_t end, bool fresh, std::vector<HostRun>& runs) {
  const uint64_t cs = geo_.cluster_size;
  const bool df = header_.has_data_file();
  for (uint64_t offset = geo_.start_of_cluster(start); offset < end;) {
    UQ_CO_ASSIGN_OR_RETURN(uint64_t l2, co_await writer_->writable_l2_table(offset));
    const uint64_t per_slice = map_->entries_per_slice();
    const uint64_t index = map_->slice_index(offset);
    const uint64_t nb = std::min(per_slice - index, geo_.size_to_clusters(end - offset));
    UQ_CO_ASSIGN_OR_RETURN(auto ref, co_await map_->l2_cache().get(map_->slice_offset(l2, offset)));
    // The clusters of this slice that have no host cluster yet; those that
    // have one (the old last cluster of a grown disk) keep it.
    std::vector<uint64_t> todo;
    for (uint64_t k = 0; k < nb; ++k) {
      const uint64_t l2e = ConstL2Slice(ref.data(), geo_).entry(index + k);
      if (l2e == 0) {
        todo.push_back(k);
      } else if (fresh) {
        co_return Error(EEXIST, "preallocation: the image already has data");
      }
    }
    ref.reset();
    if (!todo.empty()) {
      // One run of fresh host clusters for the slice; with a data file each
      // cluster's host offset is its guest offset (MappingWriter::alloc_data_clusters).
      uint64_t host = 0;
      if (!df) {
        UQ_CO_ASSIGN_OR_RETURN(host, co_await refcounts_->alloc_clusters(todo.size()));
        if (!lazy_refcounts_) UQ_CO_TRY(co_await map_->l2_cache().depend_on(refcounts_->cache()));
      }
      UQ_CO_ASSIGN_OR_RETURN(auto slice, co_await map_->l2_cache().get(map_->slice_offset(l2, offset)));
      for (size_t i = 0; i < todo.size(); ++i) {
        const uint64_t k = todo[i];
        const uint64_t h = df ? offset + k * cs : host + i * cs;
        // Extended L2: reserved clusters whose subclusters are unallocated
        // (bitmap 0), as QEMU's preallocation leaves them. They read as
        // zeros: preallocation is refused with a backing file, and a raw
        // data file holds zeros there.
        L2Slice(slice.data(), geo_).set(index + k, h | kOflagCopied, 0);
        if (!runs.empty() && runs.back().host + runs.back().length == h) {
          runs.back().length += cs;
        } else {
          runs.push_back({h, cs});
        }
      }
      map_->l2_cache().mark_dirty(slice);
    }
    offset += nb * cs;
  }
  co_return Status();
}

uint64_t Qcow2Image::data_file_end(uint64_t disk_size) const {
  // QEMU's preallocate_co extends the data file to the end of the last
  // allocation unit it maps: the disk's last cluster, or subcluster with
  // extended L2 entries.
  const uint64_t unit = geo_.subcluster_size;
  return (disk_size + unit - 1) / unit * unit;
}

Task<Status> Qcow2Image::preallocate(Preallocation mode) {
  UQ_CO_TRY(check_writable(0, size_));
  auto guard = co_await lock_.scoped_lock();
  std::vector<HostRun> runs;
  UQ_CO_TRY(co_await preallocate_metadata(0, size_, /*fresh=*/true, runs));
  guard.unlock();
  // The file must hold every cluster the L2 tables reference (QEMU grows it
  // the same way), even when nothing is written to them: a reference past
  // the end of the file is what qemu-img check reports as corruption.
  // Growing a file by truncate keeps it sparse.
  uint64_t end = 0;
  for (const HostRun& r : runs) end = std::max(end, r.host + r.length);
  if (header_.has_data_file()) end = data_file_end(size_);
  UQ_CO_ASSIGN_OR_RETURN(uint64_t length, data_file_->length());
  if (end > length) UQ_CO_TRY(data_file_->truncate(end));
  for (const HostRun& r : runs) {
    const uint64_t len = r.length;
    if (mode == Preallocation::kFalloc) {
      UQ_CO_TRY(co_await data_file_->co_write_zeroes(r.host, len, /*may_unmap=*/false));
    } else if (mode == Preallocation::kFull) {
      std::vector<std::byte> zeros(std::min<uint64_t>(len, 1 << 20));
      for (uint64_t done = 0; done < len;) {
        size_t n = static_cast<size_t>(std::min<uint64_t>(len - done, zeros.size()));
        UQ_CO_TRY(co_await data_file_->co_write(r.host + done, std::span<const std::byte>(zeros.data(), n)));
        done += n;
      }
    }
  }
  co_return co_await flush();
}

}  // namespace uqcow::qcow2
