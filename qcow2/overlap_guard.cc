#include "qcow2/overlap_guard.h"

#include "qcow2/format.h"
#include "qcow2/hex.h"

namespace uqcow::qcow2 {

void OverlapGuard::l2_tables(MetadataKind kind, const std::vector<uint64_t>& l1, bool add) {
  for (uint64_t e : l1) {
    const uint64_t l2 = e & kL1OffsetMask;
    if (!l2) continue;
    if (add) {
      regions_.add(kind, l2, cluster_size_);
    } else {
      regions_.remove(kind, l2, cluster_size_);
    }
  }
}

void OverlapGuard::active_l1_entry_changed(uint64_t old_entry, uint64_t new_entry) {
  const uint64_t old_l2 = old_entry & kL1OffsetMask;
  const uint64_t new_l2 = new_entry & kL1OffsetMask;
  if (old_l2 == new_l2) return;
  regions_.remove(MetadataKind::kActiveL2, old_l2, old_l2 ? cluster_size_ : 0);
  regions_.add(MetadataKind::kActiveL2, new_l2, new_l2 ? cluster_size_ : 0);
}

std::optional<MetadataKind> OverlapGuard::find_overlap(uint64_t offset, uint64_t length, OverlapMask mask) const {
  // QEMU aligns the range to clusters (after its header check, which the
  // aligned range answers the same way).
  const uint64_t cs = cluster_size_;
  const uint64_t start = offset & ~(cs - 1);
  const uint64_t end = offset + length > UINT64_MAX - cs ? UINT64_MAX : round_up(offset + length, cs);
  return regions_.overlaps(start, end - start, mask);
}

Status OverlapGuard::check_metadata_write(uint64_t offset, uint64_t length, const char* what, OverlapMask ignore) {
  const OverlapMask mask = mask_ & ~ignore;
  if (!mask || length == 0) return Status();
  const std::optional<MetadataKind> hit = find_overlap(offset, length, mask);
  if (!hit) return Status();
  return refuse(*hit, offset, length, what);
}

Status OverlapGuard::check_data_write(uint64_t offset, uint64_t length) {
  if (!mask_ || !checks_data_ || length == 0) return Status();
  const std::optional<MetadataKind> hit = find_overlap(offset, length, mask_);
  if (!hit) [[likely]] return Status();
  return refuse(*hit, offset, length, "guest data");
}

Status OverlapGuard::refuse(MetadataKind hit, uint64_t offset, uint64_t length, const char* what) {
  std::string why = std::string("Preventing invalid write on metadata (overlaps with ") + metadata_kind_name(hit) +
                    "): " + what + " write at " + hex(offset) + " (" + std::to_string(length) + " bytes)";
  if (hit == MetadataKind::kCryptoHeader) {
    why += "; QEMU does not check the crypto header, uqcow protects it deliberately";
  }
  return reporter_.fatal(reporter_.corruption(why));
}

Status OverlapGuard::CacheCheck::check_metadata_write(uint64_t offset, uint64_t length, const char*) {
  OverlapMask ignore = overlap_bit(own);
  if (own == MetadataKind::kActiveL2 && guard.rewriting_shared_l2_) ignore |= overlap_bit(MetadataKind::kInactiveL2);
  return guard.check_metadata_write(offset, length, metadata_kind_name(own), ignore);
}

}  // namespace uqcow::qcow2
