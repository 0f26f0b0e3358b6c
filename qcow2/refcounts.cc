// Refcounts (refcounts.h): reading and changing reference counts, and
// allocating host clusters.
#include <algorithm>
#include <cinttypes>
#include <cstdio>

#include "block/debug_event.h"
#include "block/endian.h"
#include "qcow2/header_io.h"
#include "qcow2/hex.h"
#include "qcow2/refcounts.h"
#include "qcow2/refcount_entry.h"
#include "qcow2/tables.h"

namespace uqcow::qcow2 {
namespace {
std::span<std::byte> as_bytes(std::vector<uint8_t>& v) {
  return {reinterpret_cast<std::byte*>(v.data()), v.size()};
}
}  // namespace

Refcounts::Refcounts(BlockDevice& file, Header& header, const Geometry& geo, std::unique_ptr<MetadataCache> cache,
                     MetadataCache& l2_cache, OverlapGuard& overlap, CorruptionReporter& reporter)
    : file_(&file),
      header_(header),
      geo_(geo),
      refcount_cache_(std::move(cache)),
      l2_cache_(&l2_cache),
      overlap_(&overlap),
      reporter_(&reporter) {}

Task<Status> Refcounts::load_refcount_table() {
  // refcount_table_clusters is bounded to 8 MiB by parse_header.
  uint64_t bytes = uint64_t{header_.refcount_table_clusters} << geo_.cluster_bits;
  file_->debug_event(BlkDebugEvent::kReftableLoad);
  UQ_CO_ASSIGN_OR_RETURN(reftable_, co_await read_table(*file_, header_.refcount_table_offset, bytes / 8));
  refblock_bits_ = geo_.cluster_bits + 3 - header_.refcount_order;
  UQ_CO_ASSIGN_OR_RETURN(uint64_t len, file_->length());
  alloc_end_ = (len + geo_.cluster_size - 1) & ~(geo_.cluster_size - 1);
  co_return Status();
}

Task<Result<MetadataCache::Ref>> Refcounts::load_refcount_block(uint64_t rt_index) {
  uint64_t block = reftable_[rt_index] & kReftableOffsetMask;
  if (block & (geo_.cluster_size - 1)) {
    co_return fatal_corruption(corruption("refcount block offset " + hex(block) +
                                          " unaligned (refcount table index " + std::to_string(rt_index) + ")"));
  }
  co_return co_await refcount_cache_->get(block);
}

std::optional<uint64_t> Refcounts::cached_refcount(uint64_t cluster_index) {
  const uint64_t rt = cluster_index >> refblock_bits_;
  if (rt >= reftable_.size() || (reftable_[rt] & kReftableOffsetMask) == 0) return uint64_t{0};
  const uint64_t in_block = cluster_index & ((1ull << refblock_bits_) - 1);
  if (const uint8_t* b = refcount_cache_->lookup(reftable_[rt] & kReftableOffsetMask)) {
    return get_refcount_entry(b, in_block, header_.refcount_order);
  }
  return std::nullopt;
}

Task<Result<uint64_t>> Refcounts::get_refcount(uint64_t cluster_index) {
  // Fast probe of the cache before the (suspending) load.
  if (auto cached = cached_refcount(cluster_index)) co_return *cached;
  const uint64_t rt = cluster_index >> refblock_bits_;
  const uint64_t in_block = cluster_index & ((1ull << refblock_bits_) - 1);
  UQ_CO_ASSIGN_OR_RETURN(auto ref, co_await load_refcount_block(rt));
  co_return get_refcount_entry(ref.data(), in_block, header_.refcount_order);
}

Task<Result<uint64_t>> Refcounts::find_free_clusters(uint64_t n) {
  // QEMU's alloc_clusters_noref: the first run of n clusters with refcount 0
  // at or after free_cluster_index_. Clusters no refcount block covers are
  // free, so the scan skips them a block at a time.
  uint64_t start = free_cluster_index_;
  uint64_t run = 0;
  const uint64_t per_block = 1ull << refblock_bits_;
  while (run < n) {
    uint64_t idx = start + run;
    uint64_t rt = idx >> refblock_bits_;
    if (rt >= reftable_.size() || (reftable_[rt] & kReftableOffsetMask) == 0) {
      uint64_t block_end = (rt + 1) * per_block;
      run = std::min(n, block_end - start);
      continue;
    }
    // Make sure the block is cached (this may suspend), then scan the rest of
    // it without suspending: a scan over a large image (iotest 220: 2^28
    // clusters) must not pay a coroutine frame or a cache lookup per cluster.
    const uint64_t block_offset = reftable_[rt] & kReftableOffsetMask;
    const uint8_t* block = refcount_cache_->lookup(block_offset);
    if (!block) {
      UQ_CO_TRY(co_await load_refcount_block(rt));
      continue;  // the table may have changed while suspended: look again
    }
    const uint64_t block_end = (rt + 1) * per_block;
    for (; idx < block_end && run < n; ++idx) {
      if (get_refcount_entry(block, idx & (per_block - 1), header_.refcount_order) == 0) {
        ++run;
      } else {
        start = idx + 1;
        run = 0;
      }
    }
    if ((start + run) << geo_.cluster_bits >= (1ull << 56)) {
      co_return Error(ENOSPC, file_->name() + ": no free clusters below the 64 PiB limit");
    }
  }
  free_cluster_index_ = start + n;
  alloc_end_ = std::max(alloc_end_, (start + n) << geo_.cluster_bits);
  co_return start << geo_.cluster_bits;
}

Task<Result<uint64_t>> Refcounts::alloc_clusters(uint64_t n) {
  file_->debug_event(BlkDebugEvent::kClusterAlloc);
  while (true) {
    auto offset = co_await find_free_clusters(n);
    if (!offset.ok()) co_return offset;
    Status s = co_await update_refcount(*offset, n << geo_.cluster_bits, +1, false);
    if (s.ok()) co_return offset;
    // EAGAIN: allocating a refcount block took some of the clusters we
    // found; search again (QEMU's retry loop).
    if (s.code() != EAGAIN) co_return s.error();
  }
}

Task<Result<MetadataCache::Ref>> Refcounts::refcount_block_for(uint64_t cluster_index,
                                                                bool& allocated_block) {
  uint64_t rt = cluster_index >> refblock_bits_;
  while (rt >= reftable_.size()) {
    file_->debug_event(BlkDebugEvent::kReftableGrow);
    UQ_CO_TRY(co_await grow_refcount_table(rt + 1));
  }
  if ((reftable_[rt] & kReftableOffsetMask) != 0) co_return co_await load_refcount_block(rt);

  // No block covers this cluster yet: allocate one. It may describe itself.
  allocated_block = true;
  file_->debug_event(BlkDebugEvent::kRefblockAlloc);
  UQ_CO_ASSIGN_OR_RETURN(uint64_t block, co_await find_free_clusters(1));
  uint64_t block_index = block >> geo_.cluster_bits;
  UQ_CO_TRY(overlap_->check_metadata_write(block, geo_.cluster_size, "refcount block"));
  MetadataCache::Ref ref;
  if ((block_index >> refblock_bits_) == rt) {
    UQ_CO_ASSIGN_OR_RETURN(ref, co_await refcount_cache_->get(block, /*fresh=*/true));
    set_refcount_entry(ref.data(), block_index & ((1ull << refblock_bits_) - 1), header_.refcount_order, 1);
  } else {
    // Counted by another block (allocated on demand by this same path).
    UQ_CO_TRY(co_await update_refcount(block, geo_.cluster_size, +1, false));
    UQ_CO_ASSIGN_OR_RETURN(ref, co_await refcount_cache_->get(block, /*fresh=*/true));
  }
  refcount_cache_->mark_dirty(ref);
  // reftable_ is set only once the disk's table points at the block too:
  // refcounts kept in a block the table on disk does not reach would be
  // lost on reopen (clusters in use would read as free). Until then, any
  // failure takes the block out of the cache, dirty or not: left there, it
  // would be written later over its cluster, which is still free (or
  // leaked, if another block counts it) and may be handed out again.
  struct UnhookedBlock {
    Refcounts& image;
    MetadataCache::Ref& ref;
    uint64_t block;
    bool hooked = false;
    ~UnhookedBlock() {
      if (hooked) return;
      ref.reset();
      image.refcount_cache_->discard(block);
    }
  } unhooked{*this, ref, block};
  // The block must be on disk before the refcount table points at it.
  file_->debug_event(BlkDebugEvent::kRefblockAllocWrite);
  UQ_CO_TRY(co_await refcount_cache_->flush());
  UQ_CO_TRY(co_await file_->co_flush());
  uint8_t entry[8];
  store_be64(entry, block);
  UQ_CO_TRY(overlap_->check_metadata_write(header_.refcount_table_offset + rt * 8, 8, "refcount table entry",
                                 overlap_bit(MetadataKind::kRefcountTable)));
  file_->debug_event(BlkDebugEvent::kRefblockAllocHookup);
  UQ_CO_TRY(co_await file_->co_write(header_.refcount_table_offset + rt * 8,
                                     std::span<const std::byte>(reinterpret_cast<std::byte*>(entry), 8)));
  unhooked.hooked = true;
  reftable_[rt] = block;
  overlap_->add(MetadataKind::kRefcountBlock, block, geo_.cluster_size);
  co_return ref;
}

Task<Status> Refcounts::update_refcount(uint64_t offset, uint64_t length, int64_t delta,
                                         bool discard_freed) {
  if (length == 0) co_return Status();
  const uint64_t first = offset >> geo_.cluster_bits;
  const uint64_t last = (offset + length - 1) >> geo_.cluster_bits;
  const uint64_t max = max_refcount(header_.refcount_order);
  if (delta < 0) {
    file_->debug_event(BlkDebugEvent::kClusterFree);
    // Freeing: the L2 tables that dropped these references must reach the
    // disk before the refcount blocks that free the clusters.
    UQ_CO_TRY(co_await refcount_cache_->depend_on(*l2_cache_));
  }
  bool retried_block = false;
  for (uint64_t c = first; c <= last;) {
    if (delta < 0) {
      // A cluster no refcount block covers has refcount 0: freeing it means
      // the image is corrupt. Never grow the refcount structure for that
      // (an L2 entry may point anywhere below 2^56).
      const uint64_t rt = c >> refblock_bits_;
      if (rt >= reftable_.size() || (reftable_[rt] & kReftableOffsetMask) == 0) {
        co_return corruption("refcount of cluster " + std::to_string(c) +
                             " would underflow (no refcount block covers it)");
      }
    }
    bool allocated_block = false;
    UQ_CO_ASSIGN_OR_RETURN(auto ref, co_await refcount_block_for(c, allocated_block));
    if (allocated_block && delta > 0 && !retried_block) {
      // The new block may have landed on one of the clusters we are about to
      // count (they were free when found): the caller must search again.
      uint64_t block_index = ref.offset() >> geo_.cluster_bits;
      if (block_index >= first && block_index <= last) {
        retried_block = true;
        // Undo what this call counted so far.
        if (c > first) UQ_CO_TRY(co_await update_refcount(offset, (c - first) << geo_.cluster_bits, -delta, false));
        co_return Error(EAGAIN, "refcount block allocation overlapped the request");
      }
    }
    uint64_t block_end = ((c >> refblock_bits_) + 1) << refblock_bits_;
    for (; c <= last && c < block_end; ++c) {
      uint64_t idx = c & ((1ull << refblock_bits_) - 1);
      uint64_t old = get_refcount_entry(ref.data(), idx, header_.refcount_order);
      if ((delta < 0 && old < static_cast<uint64_t>(-delta)) ||
          (delta > 0 && max - old < static_cast<uint64_t>(delta))) {
        co_return corruption("refcount of cluster " + std::to_string(c) + " would " +
                             (delta < 0 ? "underflow" : "overflow") + " (refcount " + std::to_string(old) + ")");
      }
      uint64_t now = old + static_cast<uint64_t>(delta);
      set_refcount_entry(ref.data(), idx, header_.refcount_order, now);
      if (now == 0) {
        free_cluster_index_ = std::min(free_cluster_index_, c);
        // The partly filled compressed-data cluster is gone: never pack more
        // compressed data into a cluster that may be reallocated whole.
        if (free_byte_offset_ && (free_byte_offset_ >> geo_.cluster_bits) == c) free_byte_offset_ = 0;
        // Every cached slice of a freed table goes (not only the first): a
        // stale slice would otherwise come back as the content of whatever
        // table is allocated here next.
        l2_cache_->discard_range(c << geo_.cluster_bits, geo_.cluster_size);
        refcount_cache_->discard_range(c << geo_.cluster_bits, geo_.cluster_size);
        if (discard_freed) pending_discards_.push_back(c << geo_.cluster_bits);
      }
    }
    refcount_cache_->mark_dirty(ref);
  }
  // Punch freed clusters now, under the lock, before anything can reuse
  // them (a later punch would destroy the new owner's data), as QEMU does.
  if (!pending_discards_.empty()) UQ_CO_TRY(co_await process_discards());
  co_return Status();
}

Task<Status> Refcounts::grow_refcount_table(uint64_t min_entries) {
  // The new table and the refcount blocks that count it (and themselves) go
  // in a fresh area at the end of the image: [area, area + blocks + table).
  const uint64_t cs = geo_.cluster_size;
  const uint64_t entries_per_cluster = cs / 8;
  const uint64_t area = alloc_end_ >> geo_.cluster_bits;
  // Refuse before sizing anything: the loop below walks every new entry.
  if (min_entries > kMaxRefcountTableBytes / 8) {
    co_return Error(EFBIG, file_->name() + ": the refcount table would exceed 8 MiB (" +
                               std::to_string(min_entries) + " entries needed)");
  }
  uint64_t new_entries = std::max<uint64_t>(min_entries, reftable_.size() + reftable_.size() / 2 + 1);
  uint64_t blocks = 0;
  std::vector<uint64_t> uncovered;  // reftable indices that get a new block
  for (int iter = 0;; ++iter) {
    uint64_t table_clusters = (new_entries + entries_per_cluster - 1) / entries_per_cluster;
    uint64_t end = area + blocks + table_clusters;  // exclusive, in clusters
    uint64_t last_rt = (end - 1) >> refblock_bits_;
    new_entries = std::max(new_entries, last_rt + 1);
    uncovered.clear();
    for (uint64_t rt = area >> refblock_bits_; rt <= last_rt; ++rt) {
      if (rt >= reftable_.size() || (reftable_[rt] & kReftableOffsetMask) == 0) uncovered.push_back(rt);
    }
    uint64_t new_table_clusters = (new_entries + entries_per_cluster - 1) / entries_per_cluster;
    if (uncovered.size() == blocks && new_table_clusters == table_clusters) break;
    blocks = uncovered.size();
    if (iter > 64) co_return Error(EIO, "refcount table growth did not converge");
  }
  const uint64_t table_clusters = (new_entries + entries_per_cluster - 1) / entries_per_cluster;
  if (table_clusters * cs > kMaxRefcountTableBytes) {
    co_return Error(EFBIG, file_->name() + ": the refcount table would exceed 8 MiB");
  }
  const uint64_t table_offset = (area + blocks) * cs;
  const uint64_t end = area + blocks + table_clusters;

  // Build the new blocks: refcount 1 for every area cluster they cover.
  std::vector<uint8_t> block_buf(blocks * cs, 0);
  std::vector<uint64_t> table(table_clusters * entries_per_cluster, 0);
  std::copy(reftable_.begin(), reftable_.end(), table.begin());
  for (uint64_t b = 0; b < blocks; ++b) {
    uint64_t rt = uncovered[b];
    table[rt] = (area + b) * cs;
    uint64_t lo = std::max(area, rt << refblock_bits_);
    uint64_t hi = std::min(end, (rt + 1) << refblock_bits_);
    for (uint64_t c = lo; c < hi; ++c) {
      set_refcount_entry(&block_buf[b * cs], c & ((1ull << refblock_bits_) - 1), header_.refcount_order, 1);
    }
  }
  // Area clusters that existing blocks cover are counted through the cache.
  for (uint64_t c = area; c < end; ++c) {
    uint64_t rt = c >> refblock_bits_;
    if (rt < reftable_.size() && (reftable_[rt] & kReftableOffsetMask) != 0) {
      UQ_CO_ASSIGN_OR_RETURN(auto ref, co_await load_refcount_block(rt));
      set_refcount_entry(ref.data(), c & ((1ull << refblock_bits_) - 1), header_.refcount_order, 1);
      refcount_cache_->mark_dirty(ref);
    }
  }
  std::vector<uint8_t> table_buf = encode_table(table, table_clusters * cs);

  UQ_CO_TRY(overlap_->check_metadata_write(area * cs, (end - area) * cs, "refcount table growth"));
  if (blocks) {
    file_->debug_event(BlkDebugEvent::kRefblockAllocWriteBlocks);
    UQ_CO_TRY(co_await file_->co_write(area * cs, as_bytes(block_buf)));
  }
  file_->debug_event(BlkDebugEvent::kRefblockAllocWriteTable);
  UQ_CO_TRY(co_await file_->co_write(table_offset, as_bytes(table_buf)));
  UQ_CO_TRY(co_await refcount_cache_->flush());
  UQ_CO_TRY(co_await file_->co_flush());
  // Switch the header to the new table in one write of both fields.
  file_->debug_event(BlkDebugEvent::kRefblockAllocSwitchTable);
  UQ_CO_TRY(co_await write_header_fields(
      *file_, {kOffRefcountTableOffset, table_offset}, {kOffRefcountTableClusters, table_clusters}));
  UQ_CO_TRY(co_await file_->co_flush());

  const uint64_t old_offset = header_.refcount_table_offset;
  const uint64_t old_clusters = header_.refcount_table_clusters;
  overlap_->remove(MetadataKind::kRefcountTable, old_offset, old_clusters * cs);
  header_.refcount_table_offset = table_offset;
  header_.refcount_table_clusters = static_cast<uint32_t>(table_clusters);
  reftable_ = std::move(table);
  alloc_end_ = std::max(alloc_end_, end * cs);
  overlap_->add(MetadataKind::kRefcountTable, table_offset, table_clusters * cs);
  for (uint64_t b = 0; b < blocks; ++b) overlap_->add(MetadataKind::kRefcountBlock, (area + b) * cs, cs);
  // Only now can the old table go.
  co_return co_await update_refcount(old_offset, old_clusters * cs, -1, true);
}

Task<Result<uint64_t>> Refcounts::alloc_bytes(uint64_t size) {
  // QEMU's qcow2_alloc_bytes: pack compressed clusters into a partly used
  // host cluster; each host cluster touched gains one reference.
  file_->debug_event(BlkDebugEvent::kClusterAllocBytes);
  const uint64_t cs = geo_.cluster_size;
  uint64_t offset = free_byte_offset_;
  if (offset) {
    UQ_CO_ASSIGN_OR_RETURN(uint64_t rc, co_await get_refcount(offset >> geo_.cluster_bits));
    if (rc == max_refcount(header_.refcount_order)) offset = 0;
  }
  uint64_t free_in_cluster = offset ? cs - (offset & (cs - 1)) : 0;
  while (true) {
    if (!offset || free_in_cluster < size) {
      UQ_CO_ASSIGN_OR_RETURN(uint64_t found, co_await find_free_clusters(1));
      // A compressed-cluster descriptor holds host offsets up to
      // coffset_mask only (512 TiB with 2 MiB clusters): a cluster above it
      // must not be used, or the descriptor would get a truncated offset.
      // QEMU's alloc_clusters_noref() fails the same way (iotest 220).
      if (found > geo_.coffset_mask) {
        co_return Error(EFBIG, file_->name() + ": the next free cluster at " + std::to_string(found) +
                                   " lies beyond the largest offset a compressed-cluster descriptor can "
                                   "hold (" + std::to_string(geo_.coffset_mask) + ")");
      }
      // Cluster 0 is the header; only a broken refcount says it is free
      // (QEMU marks the image corrupt: "Preventing invalid allocation of
      // compressed cluster at offset 0").
      if (found == 0) {
        co_return fatal_corruption(corruption("refusing to allocate a compressed cluster at offset 0 "
                                              "(the header's refcount is 0)"));
      }
      if (!offset || ((offset + cs - 1) & ~(cs - 1)) != found) {
        offset = found;
        free_in_cluster = cs;
      } else {
        free_in_cluster += cs;
      }
    }
    Status s = co_await update_refcount(offset, size, +1, false);
    if (s.ok()) break;
    if (s.code() != EAGAIN) co_return s.error();
    offset = 0;
  }
  free_byte_offset_ = offset + size;
  if ((free_byte_offset_ & (cs - 1)) == 0) free_byte_offset_ = 0;
  co_return offset;
}

Task<Status> Refcounts::process_discards() {
  // Called under the lock right after the refcounts dropped to zero, so the
  // clusters cannot have been reallocated yet.
  std::vector<uint64_t> pending;
  pending.swap(pending_discards_);
  for (uint64_t offset : pending) {
    (void)co_await file_->co_discard(offset, geo_.cluster_size);  // advisory
  }
  co_return Status();
}

Task<Result<uint64_t>> Refcounts::write_new_metadata(const std::vector<uint8_t>& data, MetadataKind kind) {
  if (data.empty()) co_return uint64_t{0};
  const uint64_t bytes = round_up(data.size(), geo_.cluster_size);
  UQ_CO_ASSIGN_OR_RETURN(const uint64_t offset, co_await alloc_clusters(bytes >> geo_.cluster_bits));
  std::vector<uint8_t> padded(data);
  padded.resize(bytes, 0);
  UQ_CO_TRY(overlap_->check_metadata_write(offset, bytes, metadata_kind_name(kind)));
  UQ_CO_TRY(co_await file_->co_write(offset, as_bytes(padded)));
  overlap_->add(kind, offset, bytes);
  co_return offset;
}

}  // namespace uqcow::qcow2
