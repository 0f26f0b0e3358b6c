// MetadataRegions: where the image's metadata lives, for QEMU's overlap
// check (block/qcow2-refcount.c qcow2_check_metadata_overlap). Every metadata
// write and every guest data write to the image file is checked against it;
// a write that would clobber metadata is refused and the image is marked
// corrupt.
//
// The kinds and levels are QEMU's (block/qcow2.h QCOW2_OL_*), with the same
// bit numbers; the level picks the kinds that are checked:
//   constant: header, active L1, refcount table, snapshot table, bitmap
//             directory (and uqcow's crypto header, below);
//   cached:   constant + active L2, refcount blocks, inactive L1 (QEMU's
//             default);
//   all:      cached + inactive L2: every L2 table a snapshot's L1 points at.
//
// Unlike QEMU, which walks its tables (and for inactive L2 reads every
// snapshot L1 from disk) on each check, the regions are kept as sorted sets,
// updated wherever a structure moves, appears or goes. A check first asks a
// merged index of every tracked region (one ordered lookup, as many for
// `all` as for `cached`); only a write that lands on some metadata goes on
// to the per-kind sets to learn which kind it hit.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>

#include "block/options.h"

namespace uqcow::qcow2 {

// QEMU's QCOW2_OL_*_BITNR, in QEMU's order. kCryptoHeader is uqcow's own:
// QEMU has no overlap type for the LUKS header, and uqcow deliberately keeps
// protecting it at every level but none (the error message says so).
enum class MetadataKind : uint8_t {
  kMainHeader = 0,
  kActiveL1 = 1,
  kActiveL2 = 2,
  kRefcountTable = 3,
  kRefcountBlock = 4,
  kSnapshotTable = 5,
  kInactiveL1 = 6,
  kInactiveL2 = 7,
  kBitmapDirectory = 8,
  kCryptoHeader = 9,
};
inline constexpr size_t kMetadataKinds = 10;

using OverlapMask = uint32_t;
constexpr OverlapMask overlap_bit(MetadataKind k) { return OverlapMask{1} << static_cast<unsigned>(k); }

// QCOW2_OL_CONSTANT, QCOW2_OL_CACHED and QCOW2_OL_ALL (plus the crypto header).
inline constexpr OverlapMask kOverlapConstant =
    overlap_bit(MetadataKind::kMainHeader) | overlap_bit(MetadataKind::kActiveL1) |
    overlap_bit(MetadataKind::kRefcountTable) | overlap_bit(MetadataKind::kSnapshotTable) |
    overlap_bit(MetadataKind::kBitmapDirectory) | overlap_bit(MetadataKind::kCryptoHeader);
inline constexpr OverlapMask kOverlapCached = kOverlapConstant | overlap_bit(MetadataKind::kActiveL2) |
                                              overlap_bit(MetadataKind::kRefcountBlock) |
                                              overlap_bit(MetadataKind::kInactiveL1);
inline constexpr OverlapMask kOverlapAll = kOverlapCached | overlap_bit(MetadataKind::kInactiveL2);

// QEMU's metadata_ol_names ("inactive L2 table", ...), used in messages.
const char* metadata_kind_name(MetadataKind kind);
// QEMU's option suffix ("inactive-l2" of overlap-check.inactive-l2); nullptr
// for kCryptoHeader, which has no option.
const char* metadata_kind_option(MetadataKind kind);

// The kinds of metadata the overlap check covers: the template's set
// (options.overlap_check), with the per-kind overrides applied, as QEMU's
// qcow2_update_options_prepare computes s->overlap_check.
OverlapMask overlap_check_mask(const OpenOptions& options);

class MetadataRegions {
 public:
  // Adds one reference to the region [offset, offset + length) of `kind`.
  // The same region may be referenced many times (an L2 table that several
  // snapshots share); it stays until every reference is removed. Zero
  // lengths and kinds outside the tracked mask are ignored.
  void add(MetadataKind kind, uint64_t offset, uint64_t length);
  // Drops one reference (no-op if there is none).
  void remove(MetadataKind kind, uint64_t offset, uint64_t length);
  // Forgets every region and tracks only the kinds in `tracked` from now on.
  void reset(OverlapMask tracked);
  OverlapMask tracked() const { return tracked_; }

  // The first kind of `mask`, in QEMU's check order (header, active L1,
  // refcount table, snapshot table, inactive L1, active L2, refcount block,
  // inactive L2, bitmap directory; then the crypto header), that
  // [offset, offset + length) overlaps. nullopt if none or length is 0.
  std::optional<MetadataKind> overlaps(uint64_t offset, uint64_t length, OverlapMask mask) const;

  // Distinct regions of `kind` (a region referenced twice counts once).
  size_t count(MetadataKind kind) const { return kinds_[static_cast<size_t>(kind)].regions.size(); }
  // Same regions with the same reference counts, kind by kind.
  bool operator==(const MetadataRegions& other) const;
  // The first region of `kind` that differs from `other`, as "offset+length
  // xN" on each side, for a consistency check's message; empty if equal.
  std::string describe_difference(const MetadataRegions& other) const;

 private:
  struct KindSet {
    // (start, end) -> references. Regions of one kind may overlap each other
    // in a damaged image; max_length bounds how far back a query looks.
    std::map<std::pair<uint64_t, uint64_t>, uint32_t> regions;
    uint64_t max_length = 0;
    // [lo, hi) covers every region (first start, last start + max_length):
    // most queries miss the single-region kinds (header, tables) on these
    // two compares, without a lookup.
    uint64_t lo = 0;
    uint64_t hi = 0;
    bool overlaps(uint64_t start, uint64_t end) const;
    void update_bounds();
  };
  std::optional<MetadataKind> first_overlap(uint64_t start, uint64_t end, OverlapMask mask) const;
  // The merged index: disjoint [start, end) intervals covering every region
  // of every kind. Removals leave it a superset (a hit there is confirmed
  // by the per-kind sets); it is rebuilt once removed regions outnumber a
  // quarter of the live ones, so that costs O(1) amortised per removal.
  void merge_into_index(uint64_t start, uint64_t end);
  void rebuild_index();
  std::map<uint64_t, uint64_t> index_;
  size_t live_ = 0;     // distinct regions over all kinds
  size_t removed_ = 0;  // regions gone since the last rebuild_index()

  std::array<KindSet, kMetadataKinds> kinds_;
  OverlapMask tracked_ = 0;
  OverlapMask nonempty_ = 0;
};

}  // namespace uqcow::qcow2
