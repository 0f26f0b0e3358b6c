// Preallocation of a freshly created image (qemu-img create -o
// preallocation=metadata|falloc|full). Member function of Qcow2Image.
#include <algorithm>
#include <vector>

#include "qcow2/create.h"
#include "qcow2/endian.h"
#include "qcow2/image.h"

namespace uqcow::qcow2 {

Task<Status> Qcow2Image::preallocate(Preallocation mode) {
  UQ_CO_TRY(check_writable(0, size_));
  auto guard = co_await lock_.scoped_lock();
  const uint64_t cs = geo_.cluster_size;
  std::vector<std::pair<uint64_t, uint64_t>> runs;  // host data ranges
  for (uint64_t offset = 0; offset < size_;) {
    auto l2 = co_await l2_table_for_write(offset);
    if (!l2.ok()) co_return std::move(l2).error();
    const uint64_t per_slice = 1ull << slice_bits_;
    const uint64_t index = geo_.l2_index(offset) & (per_slice - 1);
    const uint64_t nb = std::min(per_slice - index, geo_.size_to_clusters(size_ - offset));
    auto host = co_await alloc_clusters(nb);
    if (!host.ok()) co_return std::move(host).error();
    if (!lazy_refcounts_) UQ_CO_TRY(co_await set_cache_dependency(*l2_cache_, *refcount_cache_));
    auto ref = co_await l2_cache_->get(slice_offset(*l2, offset));
    if (!ref.ok()) co_return std::move(ref).error();
    for (uint64_t k = 0; k < nb; ++k) {
      uint8_t* p = ref->data() + (index + k) * geo_.l2_entry_size;
      if (load_be64(p) != 0) co_return Error(EEXIST, "preallocation: the image already has data");
      store_be64(p, (*host + k * cs) | kOflagCopied);
      // Extended L2: the clusters are reserved, their subclusters read as
      // zeros until written.
      if (geo_.extended_l2) store_be64(p + 8, 0xffffffffull << 32);
    }
    l2_cache_->mark_dirty(*ref);
    if (!runs.empty() && runs.back().first + runs.back().second == *host) {
      runs.back().second += nb * cs;
    } else {
      runs.emplace_back(*host, nb * cs);
    }
    offset += nb * cs;
  }
  guard.unlock();
  // The image file must hold every cluster the L2 tables reference (QEMU
  // grows it the same way), even when nothing is written to them: a
  // reference past the end of the file is what qemu-img check reports as
  // corruption. Growing a file by truncate keeps it sparse.
  uint64_t end = 0;
  for (auto [host, len] : runs) end = std::max(end, host + len);
  auto length = data_file_->length();
  if (!length.ok()) co_return std::move(length).error();
  if (end > *length) UQ_CO_TRY(data_file_->truncate(end));
  for (auto [host, len] : runs) {
    if (mode == Preallocation::kFalloc) {
      UQ_CO_TRY(co_await data_file_->co_write_zeroes(host, len, /*may_unmap=*/false));
    } else if (mode == Preallocation::kFull) {
      std::vector<std::byte> zeros(std::min<uint64_t>(len, 1 << 20));
      for (uint64_t done = 0; done < len;) {
        size_t n = static_cast<size_t>(std::min<uint64_t>(len - done, zeros.size()));
        UQ_CO_TRY(co_await data_file_->co_write(host + done, std::span<const std::byte>(zeros.data(), n)));
        done += n;
      }
    }
  }
  co_return co_await flush();
}

}  // namespace uqcow::qcow2
