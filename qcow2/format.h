// qcow2 on-disk constants and table-entry decoding, as specified by QEMU's
// docs/interop/qcow2.txt. Nothing here does I/O.
#pragma once

#include <cstdint>

namespace uqcow::qcow2 {

inline constexpr uint32_t kMagic = 0x514649fb;  // "QFI\xfb"
inline constexpr uint32_t kV2HeaderSize = 72;
inline constexpr uint32_t kV3HeaderSize = 104;
inline constexpr uint32_t kMinClusterBits = 9;
inline constexpr uint32_t kMaxClusterBits = 21;
inline constexpr uint32_t kMinExtendedL2ClusterBits = 14;
inline constexpr uint32_t kSectorSize = 512;

// Limits QEMU enforces on open (qcow2.h). They bound every allocation that an
// image's header can ask for.
inline constexpr uint64_t kMaxL1Bytes = 32ull << 20;        // QCOW_MAX_L1_SIZE
inline constexpr uint64_t kMaxRefcountTableBytes = 8ull << 20;  // QCOW_MAX_REFTABLE_SIZE
inline constexpr uint32_t kMaxSnapshots = 65536;
inline constexpr uint64_t kMaxSnapshotTableBytes = 64ull << 20;
inline constexpr uint32_t kMaxBackingFileName = 1023;
inline constexpr uint32_t kMaxSnapshotExtraData = 1024;
inline constexpr uint32_t kMaxExtensionBytes = 64 << 10;    // per header extension

// Incompatible feature bits.
inline constexpr uint64_t kIncompatDirty = 1ull << 0;
inline constexpr uint64_t kIncompatCorrupt = 1ull << 1;
inline constexpr uint64_t kIncompatDataFile = 1ull << 2;
inline constexpr uint64_t kIncompatCompression = 1ull << 3;
inline constexpr uint64_t kIncompatExtendedL2 = 1ull << 4;
inline constexpr uint64_t kIncompatKnown = (1ull << 5) - 1;
// Compatible feature bits.
inline constexpr uint64_t kCompatLazyRefcounts = 1ull << 0;
// Autoclear feature bits.
inline constexpr uint64_t kAutoclearBitmaps = 1ull << 0;
inline constexpr uint64_t kAutoclearDataFileRaw = 1ull << 1;
inline constexpr uint64_t kAutoclearKnown = kAutoclearBitmaps | kAutoclearDataFileRaw;

// Header extension types.
inline constexpr uint32_t kExtEnd = 0;
inline constexpr uint32_t kExtBackingFormat = 0xe2792aca;
inline constexpr uint32_t kExtFeatureTable = 0x6803f857;
inline constexpr uint32_t kExtBitmaps = 0x23852875;
inline constexpr uint32_t kExtCryptoHeader = 0x0537be77;
inline constexpr uint32_t kExtDataFile = 0x44415441;

enum class CryptMethod : uint32_t { kNone = 0, kAes = 1, kLuks = 2 };
enum class CompressionType : uint8_t { kZlib = 0, kZstd = 1 };

// L1 entries.
inline constexpr uint64_t kL1OffsetMask = 0x00fffffffffffe00ull;
inline constexpr uint64_t kL1ReservedMask = 0x7f000000000001ffull;
inline constexpr uint64_t kOflagCopied = 1ull << 63;
inline constexpr uint64_t kOflagCompressed = 1ull << 62;
inline constexpr uint64_t kOflagZero = 1ull << 0;
// L2 standard cluster descriptor.
inline constexpr uint64_t kL2OffsetMask = 0x00fffffffffffe00ull;
inline constexpr uint64_t kL2StandardReservedMask = 0x3f000000000001feull;
inline constexpr uint64_t kL2CompressedMask = 0x3fffffffffffffffull;
// Refcount table entries.
inline constexpr uint64_t kReftableOffsetMask = 0xfffffffffffffe00ull;

inline constexpr uint32_t kSubclustersPerCluster = 32;

// What one (sub)cluster of the guest maps to, QEMU's QCow2SubclusterType.
enum class SubclusterType {
  kUnallocatedPlain,  // nothing: read the backing file (or zeros)
  kUnallocatedAlloc,  // host cluster reserved (extended L2), data in backing
  kZeroPlain,         // reads as zeros, no host cluster
  kZeroAlloc,         // reads as zeros, host cluster preallocated
  kNormal,            // data at the host offset
  kCompressed,        // compressed data at a byte offset
  kInvalid,           // a combination the spec forbids
};

inline bool reads_as_zero(SubclusterType t) {
  return t == SubclusterType::kZeroPlain || t == SubclusterType::kZeroAlloc;
}
inline bool is_unallocated(SubclusterType t) {
  return t == SubclusterType::kUnallocatedPlain || t == SubclusterType::kUnallocatedAlloc;
}

// Geometry derived from cluster_bits (and extended L2); all shifts and masks
// used by the mapping code.
struct Geometry {
  uint32_t cluster_bits = 16;
  uint64_t cluster_size = 1ull << 16;
  bool extended_l2 = false;
  uint32_t l2_entry_size = 8;    // 8, or 16 with extended L2
  uint32_t l2_bits = 13;         // log2(entries per L2 table)
  uint64_t l2_entries = 1ull << 13;
  uint32_t subcluster_bits = 16; // log2(subcluster size)
  uint64_t subcluster_size = 1ull << 16;
  uint32_t csize_shift = 0;      // compressed descriptor: sector-count field
  uint64_t csize_mask = 0;
  uint64_t coffset_mask = 0;

  static Geometry make(uint32_t cluster_bits, bool extended_l2) {
    Geometry g;
    g.cluster_bits = cluster_bits;
    g.cluster_size = 1ull << cluster_bits;
    g.extended_l2 = extended_l2;
    g.l2_entry_size = extended_l2 ? 16 : 8;
    g.l2_bits = cluster_bits - (extended_l2 ? 4 : 3);
    g.l2_entries = 1ull << g.l2_bits;
    g.subcluster_bits = extended_l2 ? cluster_bits - 5 : cluster_bits;
    g.subcluster_size = 1ull << g.subcluster_bits;
    g.csize_shift = 62 - (cluster_bits - 8);
    g.csize_mask = (1ull << (cluster_bits - 8)) - 1;
    g.coffset_mask = (1ull << g.csize_shift) - 1;
    return g;
  }

  uint64_t offset_into_cluster(uint64_t off) const { return off & (cluster_size - 1); }
  uint64_t start_of_cluster(uint64_t off) const { return off & ~(cluster_size - 1); }
  uint64_t size_to_clusters(uint64_t size) const {
    return (size + cluster_size - 1) >> cluster_bits;
  }
  uint64_t l1_index(uint64_t guest) const { return guest >> (l2_bits + cluster_bits); }
  uint64_t l2_index(uint64_t guest) const { return (guest >> cluster_bits) & (l2_entries - 1); }
  uint32_t subcluster_index(uint64_t guest) const {
    return static_cast<uint32_t>(offset_into_cluster(guest) >> subcluster_bits);
  }
  // Bytes of guest space one L1 entry covers.
  uint64_t l1_entry_coverage() const { return 1ull << (l2_bits + cluster_bits); }

  // Compressed cluster descriptor: host byte offset and the number of bytes
  // that may hold the compressed stream (whole 512-byte sectors).
  uint64_t compressed_offset(uint64_t l2e) const { return l2e & coffset_mask; }
  uint64_t compressed_size(uint64_t l2e) const {
    uint64_t sectors = ((l2e & kL2CompressedMask) >> csize_shift & csize_mask) + 1;
    return sectors * kSectorSize - (compressed_offset(l2e) & (kSectorSize - 1));
  }
};

// `v` rounded up to a multiple of `to`, a power of two.
inline constexpr uint64_t round_up(uint64_t v, uint64_t to) { return (v + to - 1) & ~(to - 1); }

// Whether a (non-compressed) L2 entry points at a host cluster. Offset 0
// normally means "none", but it is a valid offset in an external data file;
// clusters there always have refcount 1, so QEMU disambiguates with COPIED.
inline bool l2_has_host(uint64_t l2e, bool data_file) {
  return (l2e & kL2OffsetMask) != 0 || (data_file && (l2e & kOflagCopied));
}

// Decodes the subcluster type of guest subcluster `sc` of a cluster whose L2
// entry is `l2e` and extended bitmap is `bitmap` (0 without extended L2).
// `v3` is false for compat=0.10 images, which have no zero flag; `data_file`
// is true for images with an external data file.
//
// As QEMU's qcow2_get_subcluster_type(), validity is a property of the whole
// cluster: a bitmap with any subcluster both "zero" and "allocated", or an
// "allocated" bit without a host cluster, makes every subcluster invalid, so
// a write anywhere in the cluster meets the damage a read would. The bitmap
// of a compressed cluster is unused and ignored, as QEMU ignores it (check
// reports it).
inline SubclusterType subcluster_type(const Geometry& g, uint64_t l2e, uint64_t bitmap,
                                      uint32_t sc, bool v3, bool data_file = false) {
  if (l2e & kOflagCompressed) return SubclusterType::kCompressed;
  bool host = l2_has_host(l2e, data_file);
  if (!g.extended_l2) {
    if (l2e & kOflagZero) {
      // compat=0.10 has no zero flag: the bit is reserved there.
      if (!v3) return SubclusterType::kInvalid;
      return host ? SubclusterType::kZeroAlloc : SubclusterType::kZeroPlain;
    }
    return host ? SubclusterType::kNormal : SubclusterType::kUnallocatedPlain;
  }
  const uint64_t alloc_bits = bitmap & 0xffffffffull;
  const uint64_t zero_bits = bitmap >> 32;
  bool alloc = (alloc_bits >> sc) & 1;
  bool zero = (zero_bits >> sc) & 1;
  if (host) {
    if (alloc_bits & zero_bits) return SubclusterType::kInvalid;
    if (zero) return SubclusterType::kZeroAlloc;
    return alloc ? SubclusterType::kNormal : SubclusterType::kUnallocatedAlloc;
  }
  if (alloc_bits) return SubclusterType::kInvalid;
  return zero ? SubclusterType::kZeroPlain : SubclusterType::kUnallocatedPlain;
}

}  // namespace uqcow::qcow2
