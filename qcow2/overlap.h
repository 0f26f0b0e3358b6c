// MetadataRegions: where the image's metadata lives, for QEMU's overlap
// check. Every metadata write and every data write to a freshly allocated
// cluster is checked against it; a write that would clobber metadata is
// refused and the image is marked corrupt.
//
// Regions never overlap each other in a consistent image, so a query only
// needs the region that starts last before the end of the write.
#pragma once

#include <cstdint>
#include <map>
#include <string>

namespace uqcow::qcow2 {

class MetadataRegions {
 public:
  void add(uint64_t offset, uint64_t length, const char* what) {
    if (length) regions_[offset] = Region{offset + length, what};
  }
  void remove(uint64_t offset, uint64_t length) {
    auto it = regions_.find(offset);
    if (it != regions_.end() && it->second.end == offset + length) regions_.erase(it);
  }
  void clear() { regions_.clear(); }
  // The name of a region that [offset, offset + length) overlaps, or nullptr.
  const char* overlaps(uint64_t offset, uint64_t length) const {
    if (length == 0) return nullptr;
    auto it = regions_.lower_bound(offset + length);
    if (it == regions_.begin()) return nullptr;
    --it;
    return it->second.end > offset ? it->second.what : nullptr;
  }
  size_t size() const { return regions_.size(); }

 private:
  struct Region {
    uint64_t end;
    const char* what;
  };
  std::map<uint64_t, Region> regions_;
};

}  // namespace uqcow::qcow2
