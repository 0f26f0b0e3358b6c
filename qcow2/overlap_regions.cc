// MetadataRegions (overlap.h): reference-counted region sets, one per kind.
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <iterator>

#include "qcow2/overlap.h"

namespace uqcow::qcow2 {
namespace {
// QEMU's check order (qcow2_check_metadata_overlap): the first hit names the
// overlap, so a table that is both an active and an inactive L2 table is
// reported as "active L2 table", as QEMU reports it.
constexpr MetadataKind kCheckOrder[] = {
    MetadataKind::kMainHeader,    MetadataKind::kActiveL1,      MetadataKind::kRefcountTable,
    MetadataKind::kSnapshotTable, MetadataKind::kInactiveL1,    MetadataKind::kActiveL2,
    MetadataKind::kRefcountBlock, MetadataKind::kInactiveL2,    MetadataKind::kBitmapDirectory,
    MetadataKind::kCryptoHeader,
};
static_assert(std::size(kCheckOrder) == kMetadataKinds);
}  // namespace

const char* metadata_kind_name(MetadataKind kind) {
  switch (kind) {
    case MetadataKind::kMainHeader: return "qcow2_header";
    case MetadataKind::kActiveL1: return "active L1 table";
    case MetadataKind::kActiveL2: return "active L2 table";
    case MetadataKind::kRefcountTable: return "refcount table";
    case MetadataKind::kRefcountBlock: return "refcount block";
    case MetadataKind::kSnapshotTable: return "snapshot table";
    case MetadataKind::kInactiveL1: return "inactive L1 table";
    case MetadataKind::kInactiveL2: return "inactive L2 table";
    case MetadataKind::kBitmapDirectory: return "bitmap directory";
    case MetadataKind::kCryptoHeader: return "crypto header";
  }
  return "metadata";
}

const char* metadata_kind_option(MetadataKind kind) {
  switch (kind) {
    case MetadataKind::kMainHeader: return "main-header";
    case MetadataKind::kActiveL1: return "active-l1";
    case MetadataKind::kActiveL2: return "active-l2";
    case MetadataKind::kRefcountTable: return "refcount-table";
    case MetadataKind::kRefcountBlock: return "refcount-block";
    case MetadataKind::kSnapshotTable: return "snapshot-table";
    case MetadataKind::kInactiveL1: return "inactive-l1";
    case MetadataKind::kInactiveL2: return "inactive-l2";
    case MetadataKind::kBitmapDirectory: return "bitmap-directory";
    case MetadataKind::kCryptoHeader: return nullptr;
  }
  return nullptr;
}

OverlapMask overlap_check_mask(const OpenOptions& o) {
  OverlapMask mask = 0;
  switch (o.overlap_check) {
    case OverlapCheck::kNone: mask = 0; break;
    case OverlapCheck::kConstant: mask = kOverlapConstant; break;
    case OverlapCheck::kCached: mask = kOverlapCached; break;
    case OverlapCheck::kAll: mask = kOverlapAll; break;
  }
  return (mask | o.overlap_check_on) & ~o.overlap_check_off;
}

void MetadataRegions::add(MetadataKind kind, uint64_t offset, uint64_t length) {
  if (length == 0 || !(tracked_ & overlap_bit(kind))) return;
  // A length from a damaged image may run past 2^64: clamp, do not wrap.
  const uint64_t end = offset + length < offset ? UINT64_MAX : offset + length;
  KindSet& set = kinds_[static_cast<size_t>(kind)];
  if (++set.regions[{offset, end}] == 1) {
    ++live_;
    merge_into_index(offset, end);
  }
  set.max_length = std::max(set.max_length, end - offset);
  set.update_bounds();
  nonempty_ |= overlap_bit(kind);
}

void MetadataRegions::remove(MetadataKind kind, uint64_t offset, uint64_t length) {
  if (length == 0 || !(tracked_ & overlap_bit(kind))) return;
  const uint64_t end = offset + length < offset ? UINT64_MAX : offset + length;
  KindSet& set = kinds_[static_cast<size_t>(kind)];
  auto it = set.regions.find({offset, end});
  if (it == set.regions.end()) return;
  if (--it->second == 0) {
    set.regions.erase(it);
    --live_;
    if (++removed_ > std::max<size_t>(64, live_ / 4)) rebuild_index();
  }
  if (set.regions.empty()) {
    set.max_length = 0;
    nonempty_ &= ~overlap_bit(kind);
  }
  set.update_bounds();
}

void MetadataRegions::merge_into_index(uint64_t start, uint64_t end) {
  // Joins every interval that overlaps or touches [start, end).
  auto it = index_.upper_bound(start);
  if (it != index_.begin() && std::prev(it)->second >= start) --it;
  while (it != index_.end() && it->first <= end) {
    start = std::min(start, it->first);
    end = std::max(end, it->second);
    it = index_.erase(it);
  }
  index_.emplace_hint(it, start, end);
}

void MetadataRegions::rebuild_index() {
  index_.clear();
  removed_ = 0;
  for (const KindSet& set : kinds_) {
    for (const auto& [region, refs] : set.regions) merge_into_index(region.first, region.second);
  }
}

void MetadataRegions::KindSet::update_bounds() {
  if (regions.empty()) {
    lo = hi = 0;
    return;
  }
  lo = regions.begin()->first.first;
  const uint64_t last = regions.rbegin()->first.first;
  hi = last > UINT64_MAX - max_length ? UINT64_MAX : last + max_length;
}

void MetadataRegions::reset(OverlapMask tracked) {
  for (KindSet& set : kinds_) set = KindSet{};
  index_.clear();
  live_ = removed_ = 0;
  tracked_ = tracked;
  nonempty_ = 0;
}

bool MetadataRegions::KindSet::overlaps(uint64_t start, uint64_t end) const {
  // The caller has checked [lo, hi).
  // Regions starting at or after `end` cannot overlap; of those before it,
  // only ones starting within max_length of `start` can reach it.
  auto it = regions.lower_bound({end, 0});
  while (it != regions.begin()) {
    --it;
    const auto [rstart, rend] = it->first;
    if (rend > start) return true;
    if (start - rstart >= max_length) return false;
  }
  return false;
}

std::optional<MetadataKind> MetadataRegions::overlaps(uint64_t offset, uint64_t length, OverlapMask mask) const {
  if (length == 0 || !(mask & nonempty_)) return std::nullopt;
  const uint64_t end = offset + length < offset ? UINT64_MAX : offset + length;
  // The index intervals are disjoint: only the last one starting before
  // `end` can reach `offset`.
  auto it = index_.lower_bound(end);
  if (it == index_.begin() || std::prev(it)->second <= offset) return std::nullopt;
  return first_overlap(offset, end, mask);
}

std::optional<MetadataKind> MetadataRegions::first_overlap(uint64_t offset, uint64_t end, OverlapMask mask) const {
  mask &= nonempty_;
  for (MetadataKind kind : kCheckOrder) {
    if (!mask) break;
    if (!(mask & overlap_bit(kind))) continue;
    mask &= ~overlap_bit(kind);
    const KindSet& set = kinds_[static_cast<size_t>(kind)];
    if (end > set.lo && offset < set.hi && set.overlaps(offset, end)) return kind;
  }
  return std::nullopt;
}

bool MetadataRegions::operator==(const MetadataRegions& other) const {
  for (size_t k = 0; k < kMetadataKinds; ++k) {
    if (kinds_[k].regions != other.kinds_[k].regions) return false;
  }
  return true;
}

std::string MetadataRegions::describe_difference(const MetadataRegions& other) const {
  auto show = [](const KindSet& set, std::pair<uint64_t, uint64_t> key) {
    auto it = set.regions.find(key);
    if (it == set.regions.end()) return std::string("absent");
    char buf[96];
    std::snprintf(buf, sizeof buf, "0x%" PRIx64 "+0x%" PRIx64 " x%u", key.first, key.second - key.first,
                  it->second);
    return std::string(buf);
  };
  for (size_t k = 0; k < kMetadataKinds; ++k) {
    const KindSet& a = kinds_[k];
    const KindSet& b = other.kinds_[k];
    for (const KindSet* from : {&a, &b}) {
      for (const auto& [key, refs] : from->regions) {
        const KindSet& to = from == &a ? b : a;
        auto it = to.regions.find(key);
        if (it == to.regions.end() || it->second != refs) {
          return std::string(metadata_kind_name(static_cast<MetadataKind>(k))) + ": " + show(a, key) + " vs " +
                 show(b, key);
        }
      }
    }
  }
  return "";
}

}  // namespace uqcow::qcow2
