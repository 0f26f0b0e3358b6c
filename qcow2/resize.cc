// Changing the virtual size (qemu-img resize). Member function of Qcow2Image.
//
// Growing may need a larger L1 table: the new table is written and flushed
// before the header points at it (l1_size and l1_table_offset are adjacent
// and change in one write), and the old one is freed afterwards, as QEMU's
// qcow2_grow_l1_table. Shrinking discards the clusters past the new end,
// frees the L2 tables and refcount blocks that no longer count anything
// (shrink.cc) and truncates the file, as QEMU's qcow2_co_truncate. An
// external data file follows the disk's size; a raw one gets the added area
// preallocated (metadata).
#include <algorithm>
#include <vector>

#include "qcow2/endian.h"
#include "qcow2/image.h"

namespace uqcow::qcow2 {

Task<Status> Qcow2Image::resize(uint64_t new_size) {
  UQ_CO_TRY(check_writable(0, 0));
  // No request may be in flight past a new, smaller end, or hold an L1
  // entry while the table moves.
  co_await requests_.drain();
  DrainedSection drained(requests_);
  if (!snapshots_.empty() && new_size < size_) {
    co_return Error(ENOTSUP, "cannot shrink an image with internal snapshots");
  }
  const uint64_t cs = geo_.cluster_size;
  if (new_size < size_) {
    // The clusters wholly past the new end are discarded, whatever they
    // hold, as QEMU's qcow2_co_truncate does (qemu-img resize --shrink).
    const uint64_t crop = (new_size + cs - 1) & ~(cs - 1);
    if (crop < size_) UQ_CO_TRY(co_await zero_clusters(crop, size_ - crop, ZeroMode::kFullDiscard));
  }
  auto guard = co_await lock_.scoped_lock();
  const uint64_t size_before = size_;
  const uint64_t need = l1_entries_for(new_size, geo_);
  if (need * 8 > kMaxL1Bytes) co_return Error(EFBIG, "size: " + std::to_string(new_size) + " needs an L1 table over 32 MiB");
  if (need > l1_.size()) {
    // Grow by at least half, as QEMU does, so repeated growth stays cheap.
    uint64_t entries = std::min<uint64_t>(std::max<uint64_t>(need, l1_.size() + l1_.size() / 2), kMaxL1Bytes / 8);
    uint64_t clusters = (entries * 8 + cs - 1) / cs;
    entries = std::min<uint64_t>(clusters * cs / 8, kMaxL1Bytes / 8);
    file_->debug_event(BlkDebugEvent::kL1GrowAllocTable);
    auto table = co_await alloc_clusters(clusters);
    if (!table.ok()) co_return std::move(table).error();
    UQ_CO_TRY(check_metadata_write(*table, clusters * cs, "active L1 table"));
    std::vector<uint8_t> buf(clusters * cs, 0);
    for (size_t i = 0; i < l1_.size(); ++i) store_be64(&buf[i * 8], l1_[i]);
    // The refcount of the new table, then the table itself, before the header.
    UQ_CO_TRY(co_await refcount_cache_->flush());
    file_->debug_event(BlkDebugEvent::kL1GrowWriteTable);
    UQ_CO_TRY(co_await file_->co_write(*table, std::span<const std::byte>(reinterpret_cast<std::byte*>(buf.data()), buf.size())));
    UQ_CO_TRY(co_await file_->co_flush());
    uint8_t fields[12];
    store_be32(fields, static_cast<uint32_t>(entries));
    store_be64(fields + 4, *table);
    file_->debug_event(BlkDebugEvent::kL1GrowActivateTable);
    UQ_CO_TRY(co_await file_->co_write(36, std::span<const std::byte>(reinterpret_cast<std::byte*>(fields), 12)));
    UQ_CO_TRY(co_await file_->co_flush());
    const uint64_t old_offset = header_.l1_table_offset;
    const uint64_t old_bytes = (uint64_t{header_.l1_size} * 8 + cs - 1) / cs * cs;
    overlap_remove(MetadataKind::kActiveL1, old_offset, old_bytes);
    overlap_add(MetadataKind::kActiveL1, *table, clusters * cs);
    header_.l1_table_offset = *table;
    header_.l1_size = static_cast<uint32_t>(entries);
    l1_.resize(entries, 0);
    if (old_bytes) UQ_CO_TRY(co_await update_refcount(old_offset, old_bytes, -1, options_.pass_discard_other));
  }
  if (new_size < size_) {
    // As QEMU's qcow2_co_truncate: the metadata past the new end goes before
    // the size changes, so a failure leaves the old size. The discarded
    // clusters are freed first (no request is in flight to wait for).
    UQ_CO_TRY(co_await flush_metadata());
    UQ_CO_TRY(co_await shrink_l1_table(need));
    UQ_CO_TRY(co_await shrink_refcount_table());
    UQ_CO_TRY(co_await truncate_to_last_cluster());
  }
  if (header_.data_file_raw() && new_size > size_) {
    // QEMU's qcow2_co_truncate: a raw data file reads as the disk only if
    // the L2 tables map every guest cluster 1:1, so the added area is
    // preallocated (metadata), as creation preallocates the whole disk.
    std::vector<HostRun> runs;
    UQ_CO_TRY(co_await preallocate_metadata(size_, new_size, /*fresh=*/false, runs));
    UQ_CO_TRY(co_await l2_cache_->flush());
    UQ_CO_TRY(co_await refcount_cache_->flush());
    UQ_CO_TRY(co_await file_->co_flush());
  }
  // QEMU resizes an external data file with the disk: clusters sit at their
  // guest offsets, so it holds exactly the disk (a raw one as preallocation
  // leaves it, data_file_end). It grows before the header says the disk is
  // larger, and shrinks after it says the disk is smaller, so the disk never
  // reaches past its end.
  const bool data_file = header_.has_data_file();
  if (data_file && new_size > size_) {
    const uint64_t end = header_.data_file_raw() ? data_file_end(new_size) : new_size;
    auto length = data_file_->length();
    if (!length.ok()) co_return std::move(length).error();
    if (end > *length) UQ_CO_TRY(data_file_->truncate(end));
    UQ_CO_TRY(co_await data_file_->co_flush());
  }
  uint8_t size_field[8];
  store_be64(size_field, new_size);
  UQ_CO_TRY(co_await file_->co_write(24, std::span<const std::byte>(reinterpret_cast<std::byte*>(size_field), 8)));
  UQ_CO_TRY(co_await file_->co_flush());
  header_.size = new_size;
  size_ = new_size;
  if (data_file && new_size < size_before) UQ_CO_TRY(data_file_->truncate(new_size));
  co_return Status();
}

}  // namespace uqcow::qcow2
