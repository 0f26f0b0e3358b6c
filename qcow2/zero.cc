// Zero writes, discards and compressed writes: QEMU's zero_in_l2_slice,
// discard_in_l2_slice and qcow2_co_pwritev_compressed. Member functions of
// Qcow2Image.
#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "block/debug_event.h"
#include "block/endian.h"
#include "qcow2/compress.h"
#include "qcow2/image.h"
#include "qcow2/tables.h"

namespace uqcow::qcow2 {
namespace {
constexpr uint64_t kAllocMask = 0xffffffffull;
constexpr uint64_t kZeroMask = 0xffffffffull << 32;
}  // namespace

Task<Status> Qcow2Image::write_zero_buffers(uint64_t offset, uint64_t len) {
  // Explicit zero buffers: the fallback when the metadata cannot say "zero",
  // as QEMU's block layer does on -ENOTSUP.
  std::vector<std::byte> zeros(std::min<uint64_t>(len, 1 << 20));
  while (len) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(len, zeros.size()));
    UQ_CO_TRY(co_await write_range(offset, std::span<const std::byte>(zeros.data(), n), Entry::kWithinRequest));
    offset += n;
    len -= n;
  }
  co_return Status();
}

Task<Status> Qcow2Image::write_zeroes(uint64_t offset, uint64_t len, bool may_unmap) {
  if (!requests_.admitting()) [[unlikely]] co_await requests_.wait_admitted();
  InFlightTracker::Ticket ticket(requests_);
  co_return co_await write_zeroes_range(offset, len, may_unmap);
}

Task<Status> Qcow2Image::write_zeroes_range(uint64_t offset, uint64_t len, bool may_unmap) {
  UQ_CO_TRY(check_writable(offset, len));
  file_->debug_event(BlkDebugEvent::kPwritevZero);
  if (len == 0) co_return Status();
  if (!v3_) co_return co_await write_zero_buffers(offset, len);  // no zero flag in v2
  const uint64_t gran = geo_.subcluster_size;
  uint64_t start = (offset + gran - 1) & ~(gran - 1);
  uint64_t end = (offset + len) & ~(gran - 1);
  if (offset + len == size_) end = offset + len;  // the disk's partial last (sub)cluster
  if (start >= end) co_return co_await write_zero_buffers(offset, len);
  if (start > offset) UQ_CO_TRY(co_await write_zero_buffers(offset, start - offset));
  UQ_CO_TRY(co_await zero_clusters(start, end - start, may_unmap ? ZeroMode::kZeroMayUnmap : ZeroMode::kZero));
  if (offset + len > end) UQ_CO_TRY(co_await write_zero_buffers(end, offset + len - end));
  co_return Status();
}

Task<Status> Qcow2Image::discard(uint64_t offset, uint64_t len) {
  if (!requests_.admitting()) [[unlikely]] co_await requests_.wait_admitted();
  InFlightTracker::Ticket ticket(requests_);
  UQ_CO_TRY(check_writable(offset, len));
  // A compat=0.10 image has no zero flag: a discarded cluster would show the
  // backing file's data, so with a backing file nothing is discarded (QEMU).
  if (!v3_ && backing_) co_return Status();
  // Only whole clusters are discarded (and the disk's partial last cluster);
  // partial clusters are left alone, as QEMU does.
  const uint64_t cs = geo_.cluster_size;
  uint64_t start = (offset + cs - 1) & ~(cs - 1);
  uint64_t end = (offset + len) & ~(cs - 1);
  if (offset + len == size_ && size_ > end) end = size_;
  if (start >= end) co_return Status();
  co_return co_await zero_clusters(start, end - start, ZeroMode::kDiscard);
}

Task<Status> Qcow2Image::zero_clusters(uint64_t offset, uint64_t len, ZeroMode mode) {
  const uint64_t end = offset + len;
  const bool discard_mode = mode == ZeroMode::kDiscard || mode == ZeroMode::kFullDiscard;
  const bool full_discard = mode == ZeroMode::kFullDiscard;
  const bool may_unmap = mode != ZeroMode::kZero;
  auto guard = co_await lock_.scoped_lock();
  // Allocations in flight on the range finish first: their plans (COW data,
  // host clusters kept in place, clusters to free) assume the entries they
  // saw. From here on the lock is held until every entry is changed, so no
  // new allocation can start on the range.
  co_await inflight_->wait_for_overlapping(geo_.start_of_cluster(offset), end, lock_, guard);
  UQ_CO_TRY(check_writable(offset, len));
  if (!freed_->empty()) UQ_CO_TRY(co_await freed_->release());
  UQ_CO_TRY(co_await mark_dirty_for_lazy_refcounts());
  if (header_.data_file_raw()) {
    // The raw data file must read as the guest disk on its own, so the
    // zeros go there first, as QEMU's qcow2_subcluster_zeroize does. QEMU
    // 7.2 leaves a discard to the passthrough (which punches a hole where
    // the file system can, and is skipped when pass-discard-request is
    // off); here a discard zeroes the range too, so the raw view never
    // keeps data the qcow2 view has dropped.
    data_file_->debug_event(BlkDebugEvent::kPwritevZero);
    UQ_CO_TRY(co_await data_file_->co_write_zeroes(offset, len, may_unmap || discard_mode));
  }
  std::vector<uint64_t> to_free;
  std::vector<std::pair<uint64_t, uint64_t>> zero_by_writing;  // (offset, length)
  while (offset < end) {
    const uint64_t guest_cluster = geo_.start_of_cluster(offset);
    const uint64_t chunk_end = std::min(end, guest_cluster + geo_.cluster_size);
    const bool whole = offset == guest_cluster && (chunk_end == guest_cluster + geo_.cluster_size || chunk_end == size_);
    auto l2_now = map_->l2_table_of(offset);
    if (!l2_now.ok()) co_return fatal_corruption(std::move(l2_now).error());
    if (discard_mode && *l2_now == 0 && (!backing_ || full_discard)) {  // nothing allocated here
      offset = chunk_end;
      continue;
    }
    UQ_CO_ASSIGN_OR_RETURN(uint64_t l2, co_await writer_->writable_l2_table(offset));
    const uint64_t slice = map_->slice_offset(l2, offset);
    UQ_CO_ASSIGN_OR_RETURN(auto ref, co_await map_->l2_cache().get(slice));
    L2Slice entries(ref.data(), geo_);
    const uint64_t index = map_->slice_index(offset);
    const uint64_t old = entries.entry(index);
    const uint64_t old_bitmap = entries.bitmap(index);
    const bool compressed = old & kOflagCompressed;
    const bool allocated = compressed || l2_has_host(old, header_.has_data_file());
    uint64_t entry = old, bitmap = old_bitmap;
    bool free_old = false;
    if (full_discard) {
      entry = 0;
      bitmap = 0;
      free_old = allocated;
    } else if (discard_mode) {
      if (backing_ || allocated) {
        entry = geo_.extended_l2 ? 0 : (v3_ ? kOflagZero : 0);
        bitmap = geo_.extended_l2 ? kZeroMask : 0;
        free_old = allocated;
      }
    } else if (whole) {
      const bool unmap = compressed || (may_unmap && allocated);
      entry = unmap ? 0 : old;
      if (geo_.extended_l2) {
        bitmap = kZeroMask;
      } else {
        entry |= kOflagZero;
      }
      free_old = unmap;
    } else {
      // Part of a cluster (extended L2 only): mark those subclusters zero.
      if (compressed) {
        // A compressed cluster has no subclusters: write zeros into it
        // (decompressing it) once the other clusters are done and freed.
        // Returning here instead leaked the clusters zeroed so far and left
        // the rest of the range unzeroed.
        zero_by_writing.emplace_back(offset, chunk_end - offset);
        offset = chunk_end;
        continue;
      }
      uint32_t sc0 = geo_.subcluster_index(offset);
      uint32_t sc1 = static_cast<uint32_t>((chunk_end - guest_cluster + geo_.subcluster_size - 1) >> geo_.subcluster_bits);
      uint64_t range = ((sc1 >= 32 ? kAllocMask : ((1ull << sc1) - 1))) & ~((1ull << sc0) - 1);
      bitmap = (old_bitmap | (range << 32)) & ~range;
    }
    if (entry != old || bitmap != old_bitmap) {
      entries.set(index, entry, bitmap);
      map_->l2_cache().mark_dirty(ref);
      if (free_old) to_free.push_back(old);
    }
    offset = chunk_end;
  }
  const bool pass = options_.pass_discard_request;
  for (uint64_t old : to_free) UQ_CO_TRY(co_await freed_->defer(old, pass));
  guard.unlock();  // write() takes the lock itself
  for (const auto& [at, length] : zero_by_writing) {
    UQ_CO_TRY(co_await write_zero_buffers(at, length));
  }
  co_return Status();
}

Task<Status> Qcow2Image::write_compressed(uint64_t offset, std::span<const std::byte> buf) {
  if (!requests_.admitting()) [[unlikely]] co_await requests_.wait_admitted();
  InFlightTracker::Ticket ticket(requests_);
  const uint64_t cs = geo_.cluster_size;
  UQ_CO_TRY(check_writable(offset, buf.size()));
  if (header_.crypt_method != CryptMethod::kNone) {
    co_return Error(ENOTSUP, "compressed writes are not allowed in encrypted images");
  }
  if (header_.has_data_file()) {
    co_return Error(ENOTSUP, "compressed writes are not allowed with an external data file");
  }
  if (offset & (cs - 1)) co_return Error(EINVAL, "compressed writes must start on a cluster boundary");
  while (!buf.empty()) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), cs));
    if (n < cs && offset + n != size_) {
      co_return Error(EINVAL, "compressed writes must cover whole clusters (or the disk's last one)");
    }
    std::vector<uint8_t> in(cs, 0), out(cs);
    std::memcpy(in.data(), buf.data(), n);
    UQ_CO_ASSIGN_OR_RETURN(size_t csize, compress_cluster(header_.compression_type, in, out));
    if (csize == 0) {
      UQ_CO_TRY(co_await write_range(offset, buf.first(n), Entry::kWithinRequest));  // incompressible
    } else {
      UQ_CO_TRY(co_await write_compressed_cluster(offset, std::span<const uint8_t>(out.data(), csize)));
    }
    offset += n;
    buf = buf.subspan(n);
  }
  co_return Status();
}

Task<Status> Qcow2Image::write_compressed_cluster(uint64_t offset, std::span<const uint8_t> data) {
  auto guard = co_await lock_.scoped_lock();
  while (true) {
    uint64_t len = geo_.cluster_size;
    Status s = co_await inflight_->wait_for_dependencies(offset, len, lock_, guard);
    if (s.ok()) break;
    if (s.code() != EAGAIN) co_return s.error();
  }
  UQ_CO_TRY(check_writable(offset, 0));  // closed or marked corrupt while we waited?
  if (!freed_->empty()) UQ_CO_TRY(co_await freed_->release());
  UQ_CO_TRY(co_await mark_dirty_for_lazy_refcounts());
  UQ_CO_ASSIGN_OR_RETURN(uint64_t l2, co_await writer_->writable_l2_table(offset));
  {
    UQ_CO_ASSIGN_OR_RETURN(auto ref, co_await map_->l2_cache().get(map_->slice_offset(l2, offset)));
    const uint64_t old = ConstL2Slice(ref.data(), geo_).entry(map_->slice_index(offset));
    // Compression never overwrites: QEMU refuses with EIO as well.
    if ((old & kL2OffsetMask) || (old & kOflagCompressed)) {
      co_return Error(EIO, "compressed write to an allocated cluster at " + std::to_string(offset) +
                               " (compression can only fill unallocated clusters)");
    }
  }
  UQ_CO_ASSIGN_OR_RETURN(uint64_t coffset, co_await refcounts_->alloc_bytes(data.size()));
  const uint64_t nb_csectors = ((coffset + data.size() - 1) >> 9) - (coffset >> 9);
  const uint64_t l2e = kOflagCompressed | (nb_csectors << geo_.csize_shift) | coffset;
  // Unregistered when this returns, with the lock held again.
  AllocationsInFlight::Allocation flight(*inflight_, offset, offset + geo_.cluster_size);
  guard.unlock();
  Status s = overlap_->check_data_write(coffset, data.size());
  if (s.ok()) {
    file_->debug_event(BlkDebugEvent::kWriteCompressed);
    s = co_await file_->co_write(coffset, std::span<const std::byte>(reinterpret_cast<const std::byte*>(data.data()), data.size()));
  }
  guard = co_await lock_.scoped_lock();
  if (s.ok()) {
    if (!lazy_refcounts_) s = co_await map_->l2_cache().depend_on(refcounts_->cache());
    auto l2b = co_await writer_->writable_l2_table(offset);
    if (!l2b.ok()) s = std::move(l2b).error();
    if (s.ok()) {
      auto ref = co_await map_->l2_cache().get(map_->slice_offset(*l2b, offset));
      if (!ref.ok()) {
        s = std::move(ref).error();
      } else {
        L2Slice entries(ref->data(), geo_);
        // Invariant (see link_l2): the range was registered in flight, so
        // the entry is still the unallocated one checked above.
        const uint64_t now = entries.entry(map_->slice_index(offset));
        if ((now & kL2OffsetMask) || (now & kOflagCompressed)) {
          s = Error(EIO, "internal error: the L2 entry of guest offset " + std::to_string(offset) +
                             " was allocated while a compressed write to it was in flight");
        } else {
          // The compressed data is durable before the entry (see link_l2).
          map_->l2_cache().set_depends_on_flush();
          file_->debug_event(BlkDebugEvent::kL2UpdateCompressed);
          entries.set(map_->slice_index(offset), l2e, 0);
          map_->l2_cache().mark_dirty(*ref);
        }
      }
    }
  }
  if (!s.ok()) (void)co_await refcounts_->update_refcount(coffset, data.size(), -1, false);
  co_return s;
}

}  // namespace uqcow::qcow2
