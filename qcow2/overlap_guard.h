// OverlapGuard: QEMU's overlap check (qcow2_check_metadata_overlap and
// qcow2_pre_write_overlap_check) as a component. It owns the regions of the
// image's metadata (MetadataRegions, overlap.h) and the kinds checked, and
// refuses a write that would land on metadata, marking the image corrupt
// through the CorruptionReporter.
//
// Invariant (read-write opens): the regions are exactly those the image's
// collect_metadata_regions() (metadata_walk.h) would find from the header, the active L1
// table, the refcount table, the snapshot table and the snapshot L1 tables,
// for the kinds checked. Whoever moves, adds or drops one of those
// structures updates the guard in the same step (add/remove/l2_tables).
// Freed clusters are not removed wholesale: a structure leaves the set when
// it is unlinked, so a cluster freed while some table still points at it
// (corrupt refcounts) stays protected.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "engine/result.h"
#include "qcow2/cache.h"
#include "qcow2/corruption.h"
#include "qcow2/overlap.h"

namespace uqcow::qcow2 {

class OverlapGuard {
 public:
  // `checks_data`: guest data lives in the image file (no external data
  // file), so data writes are checked too.
  OverlapGuard(CorruptionReporter& reporter, uint64_t cluster_size, bool checks_data)
      : reporter_(reporter), cluster_size_(cluster_size), checks_data_(checks_data) {}
  OverlapGuard(const OverlapGuard&) = delete;
  OverlapGuard& operator=(const OverlapGuard&) = delete;

  // Starts checking the kinds of `mask` against `regions` (built by the
  // image from its tables).
  void reset(MetadataRegions regions, OverlapMask mask) {
    regions_ = std::move(regions);
    mask_ = mask;
  }
  const MetadataRegions& regions() const { return regions_; }
  OverlapMask mask() const { return mask_; }

  void add(MetadataKind kind, uint64_t offset, uint64_t length) { regions_.add(kind, offset, length); }
  void remove(MetadataKind kind, uint64_t offset, uint64_t length) { regions_.remove(kind, offset, length); }
  // Adds (or removes) one reference of `kind` per L2 table an L1 table
  // points at.
  void l2_tables(MetadataKind kind, const std::vector<uint64_t>& l1, bool add);
  // One L1 entry changed from `old_entry` to `new_entry`: its active L2
  // region follows.
  void active_l1_entry_changed(uint64_t old_entry, uint64_t new_entry);

  // OK, or EIO after marking the image corrupt when [offset, offset +
  // length) overlaps a region of a checked kind outside `ignore` (QEMU's
  // `ign`: a write to an existing structure ignores its own kind; a write
  // to fresh clusters ignores nothing). `what` names the write.
  Status check_metadata_write(uint64_t offset, uint64_t length, const char* what, OverlapMask ignore = 0);
  // A guest data write to the image file (OK at once with an external data
  // file: no metadata lives there). One merged-index lookup per write.
  Status check_data_write(uint64_t offset, uint64_t length);
  // The first checked kind of `mask` that the cluster-aligned range hits.
  std::optional<MetadataKind> find_overlap(uint64_t offset, uint64_t length, OverlapMask mask) const;

  // While one lives, writes of the active-L2 cache may also land on inactive
  // L2 tables: snapshot apply and delete rewrite OFLAG_COPIED in L2 tables
  // that other snapshots may share (QEMU would refuse that under
  // overlap-check=all and mark the image corrupt).
  class SharedL2Rewrite {
   public:
    explicit SharedL2Rewrite(OverlapGuard& g) : g_(g) { g_.rewriting_shared_l2_ = true; }
    ~SharedL2Rewrite() { g_.rewriting_shared_l2_ = false; }
    SharedL2Rewrite(const SharedL2Rewrite&) = delete;
    SharedL2Rewrite& operator=(const SharedL2Rewrite&) = delete;

   private:
    OverlapGuard& g_;
  };

  // The checks a metadata cache runs before each write-back: a table may be
  // written over its own kind (as QEMU's cache flush).
  MetadataWriteCheck& l2_cache_check() { return l2_cache_check_; }
  MetadataWriteCheck& refcount_cache_check() { return refcount_cache_check_; }

 private:
  struct CacheCheck final : MetadataWriteCheck {
    OverlapGuard& guard;
    MetadataKind own;
    CacheCheck(OverlapGuard& g, MetadataKind k) : guard(g), own(k) {}
    Status check_metadata_write(uint64_t offset, uint64_t length, const char*) override;
  };
  Status refuse(MetadataKind hit, uint64_t offset, uint64_t length, const char* what);

  CorruptionReporter& reporter_;
  const uint64_t cluster_size_;
  const bool checks_data_;
  MetadataRegions regions_;
  OverlapMask mask_ = 0;
  bool rewriting_shared_l2_ = false;
  CacheCheck l2_cache_check_{*this, MetadataKind::kActiveL2};
  CacheCheck refcount_cache_check_{*this, MetadataKind::kRefcountBlock};
};

}  // namespace uqcow::qcow2
