// The write entry points of Qcow2Image: admission, the lock-free in-place
// fast path, and the locked protocol around one allocating step (QEMU's
// qcow2_co_pwritev_part): wait for the allocations in flight it depends on,
// release deferred frees, set the lazy-refcounts dirty bit, then hand the
// step to the MappingWriter (mapping_writer.h), which plans, copies on
// write and links. Also the header's incompatible bits (dirty, corrupt).
#include <algorithm>
#include <cstring>

#include "block/debug_event.h"
#include "qcow2/header_io.h"
#include "qcow2/image.h"

namespace uqcow::qcow2 {

Status Qcow2Image::check_writable(uint64_t offset, uint64_t len) const {
  if (closed_) return Error(EBADF, file_->name() + " is closed");
  if (options_.read_only) return Error(EROFS, file_->name() + " is open read-only");
  if (reporter_.marked_corrupt()) return Error(EIO, file_->name() + " has been marked corrupt; writes are refused");
  if (offset > size_ || len > size_ - offset) {
    return Error(EINVAL, "write of " + std::to_string(len) + " bytes at " + std::to_string(offset) +
                             " is beyond the end of the disk (" + std::to_string(size_) + " bytes)");
  }
  return Status();
}

Task<Status> Qcow2Image::write_range(uint64_t offset, std::span<const std::byte> buf, Entry entry) {
  // A new request holds a ticket until its data is written: a host cluster
  // it maps cannot be reused by another guest offset until then
  // (FreedClusters::defer).
  std::optional<InFlightTracker::Ticket> ticket;
  if (entry == Entry::kNewRequest) {
    if (!requests_.admitting()) [[unlikely]] co_await requests_.wait_admitted();
    ticket.emplace(requests_);
  }
  UQ_CO_TRY(check_writable(offset, buf.size()));
  while (!bitmaps_ready()) [[unlikely]] UQ_CO_TRY(co_await set_bitmaps_in_use());
  track_change(offset, buf.size());
  if (encrypted() && ((offset | buf.size()) & (crypto::kSectorSize - 1))) {
    co_return co_await write_unaligned(offset, buf);
  }
  while (!buf.empty()) {
    Result<Mapping> m = Mapping{};
    // Fast path: a cached mapping to a COPIED cluster is overwritten in place
    // without the lock, like a read.
    if (map_->map_fast(offset, buf.size(), m) && m.ok() && m->type == SubclusterType::kNormal && m->copied) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(m->bytes, buf.size()));
      UQ_CO_TRY(overlap_->check_data_write(m->host_offset, n));
      data_file_->debug_event(BlkDebugEvent::kWriteAio);
      if (crypto_) {
        UQ_CO_TRY(co_await crypto_->write(*data_file_, offset, m->host_offset, buf.first(n)));
      } else {
        UQ_CO_TRY(co_await data_file_->co_write(m->host_offset, buf.first(n)));
      }
      offset += n;
      buf = buf.subspan(n);
      continue;
    }
    UQ_CO_ASSIGN_OR_RETURN(size_t done, co_await write_allocating(offset, buf));
    offset += done;
    buf = buf.subspan(done);
  }
  co_return Status();
}

Task<Result<size_t>> Qcow2Image::write_allocating(uint64_t offset, std::span<const std::byte> buf) {
  auto guard = co_await lock_.scoped_lock();
  uint64_t len = buf.size();
  while (true) {
    len = buf.size();
    Status s = co_await inflight_->wait_for_dependencies(offset, len, lock_, guard);
    if (s.ok()) break;
    if (s.code() != EAGAIN) co_return s.error();
  }
  UQ_CO_TRY(check_writable(offset, len));
  if (!freed_->empty()) UQ_CO_TRY(co_await freed_->release());
  UQ_CO_TRY(co_await mark_dirty_for_lazy_refcounts());
  co_return co_await writer_->write_step(offset, buf.first(len), guard);
}

Task<Status> Qcow2Image::read_cow(uint64_t guest, std::span<std::byte> out) {
  // Copy-on-write data is simply what the guest sees there now: the range is
  // registered in flight, so its mapping cannot change until it is linked.
  // Bytes past the end of the disk (slack of the last cluster) are zeros.
  size_t in_disk = guest >= size_ ? 0 : static_cast<size_t>(std::min<uint64_t>(out.size(), size_ - guest));
  if (in_disk) UQ_CO_TRY(co_await read_range(guest, out.first(in_disk), Entry::kWithinRequest));
  std::memset(out.data() + in_disk, 0, out.size() - in_disk);
  co_return Status();
}

Task<Status> Qcow2Image::mark_dirty_for_lazy_refcounts() {
  if (!lazy_refcounts_ || marked_dirty_) co_return Status();
  // Before any metadata that relies on lazy refcounts can reach the disk.
  UQ_CO_TRY(co_await write_header_incompatible(header_.incompatible_features | kIncompatDirty));
  UQ_CO_TRY(co_await file_->co_flush());
  marked_dirty_ = true;
  co_return Status();
}

Task<Status> Qcow2Image::write_header_incompatible(uint64_t bits) {
  if (header_.version < 3) co_return Status();
  header_.incompatible_features = bits;
  co_return co_await write_header_fields(*file_, {kOffIncompatible, bits});
}

}  // namespace uqcow::qcow2
