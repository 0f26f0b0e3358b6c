// Zero writes, discards and compressed writes of Qcow2Image: admission,
// alignment (what the metadata can zero, what must be written as zero
// buffers), compression, and the locked protocol around the
// MappingWriter's entry changes (QEMU's qcow2_co_pwrite_zeroes,
// qcow2_co_pdiscard, qcow2_co_pwritev_compressed).
#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "block/debug_event.h"
#include "qcow2/compress.h"
#include "qcow2/image.h"

namespace uqcow::qcow2 {

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
  while (!bitmaps_ready()) [[unlikely]] UQ_CO_TRY(co_await set_bitmaps_in_use());
  track_change(offset, len);
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
  while (!bitmaps_ready()) [[unlikely]] UQ_CO_TRY(co_await set_bitmaps_in_use());
  track_change(offset, len);  // as QEMU: the whole range, even what is not discarded
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
  std::vector<std::pair<uint64_t, uint64_t>> zero_by_writing;  // (offset, length)
  UQ_CO_TRY(co_await writer_->zero_clusters(offset, len, mode, size_, options_.pass_discard_request, zero_by_writing));
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
  while (!bitmaps_ready()) [[unlikely]] UQ_CO_TRY(co_await set_bitmaps_in_use());
  track_change(offset, buf.size());
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
  co_return co_await writer_->write_compressed_step(offset, data, guard);
}

}  // namespace uqcow::qcow2
