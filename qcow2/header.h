// The qcow2 header and its extensions: parsing, validation and serialisation.
//
// parse_header() treats every byte as untrusted: each refusal is an Error
// (EINVAL, or ENOTSUP for unsupported features) whose message names the
// offending field with the spec's name, e.g. "cluster_bits". Nothing is
// allocated in proportion to an unvalidated field.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "engine/result.h"
#include "qcow2/format.h"

namespace uqcow::qcow2 {

// Byte offsets of the header fields (docs/interop/qcow2.txt, "Header"), the
// one place that knows them: parse_header(), serialize_header() and the
// in-place field writers (header_io.h) use these names.
enum HeaderOffset : size_t {
  kOffMagic = 0,
  kOffVersion = 4,
  kOffBackingFileOffset = 8,
  kOffBackingFileSize = 16,
  kOffClusterBits = 20,
  kOffSize = 24,
  kOffCryptMethod = 32,
  kOffL1Size = 36,
  kOffL1TableOffset = 40,
  kOffRefcountTableOffset = 48,
  kOffRefcountTableClusters = 56,
  kOffNbSnapshots = 60,
  kOffSnapshotsOffset = 64,
  kOffIncompatible = 72,
  kOffCompatible = 80,
  kOffAutoclear = 88,
  kOffRefcountOrder = 96,
  kOffHeaderLength = 100,
  kOffCompressionType = 104,
};

struct FeatureName {
  uint8_t type = 0;  // 0 incompatible, 1 compatible, 2 autoclear
  uint8_t bit = 0;
  std::string name;
};

struct UnknownExtension {
  uint32_t type = 0;
  std::vector<uint8_t> data;
};

struct CryptoHeaderExtension {
  uint64_t offset = 0;
  uint64_t length = 0;
};

struct BitmapsExtension {
  uint32_t nb_bitmaps = 0;
  uint64_t directory_size = 0;
  uint64_t directory_offset = 0;
};

struct Header {
  uint32_t version = 3;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t cluster_bits = 16;
  uint64_t size = 0;
  CryptMethod crypt_method = CryptMethod::kNone;
  uint32_t l1_size = 0;
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  // v3 fields (v2 images get the v2 meaning: no features, refcount_order 4).
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  uint32_t refcount_order = 4;
  uint32_t header_length = kV3HeaderSize;
  CompressionType compression_type = CompressionType::kZlib;
  // Header bytes between the known fields and header_length, kept verbatim so
  // a rewrite by this version does not drop fields of a newer one.
  std::vector<uint8_t> extra_header_bytes;

  // Extensions.
  std::string backing_file;
  std::optional<std::string> backing_format;
  std::vector<FeatureName> feature_names;
  std::optional<BitmapsExtension> bitmaps;
  std::optional<CryptoHeaderExtension> crypto_header;
  std::optional<std::string> data_file;
  std::vector<UnknownExtension> unknown_extensions;

  bool dirty() const { return incompatible_features & kIncompatDirty; }
  bool corrupt() const { return incompatible_features & kIncompatCorrupt; }
  bool has_data_file() const { return incompatible_features & kIncompatDataFile; }
  bool data_file_raw() const { return autoclear_features & kAutoclearDataFileRaw; }
  bool extended_l2() const { return incompatible_features & kIncompatExtendedL2; }
  bool lazy_refcounts() const { return compatible_features & kCompatLazyRefcounts; }
  uint32_t refcount_bits() const { return 1u << refcount_order; }
  uint64_t cluster_size() const { return 1ull << cluster_bits; }
  Geometry geometry() const { return Geometry::make(cluster_bits, extended_l2()); }

  // Name of a feature bit from the image's feature name table, if present.
  std::optional<std::string> feature_name(uint8_t type, uint8_t bit) const;
};

// What the header is parsed for. kOpen makes every check qcow2_do_open()
// makes; kCheck is QEMU's BDRV_O_CHECK open (qemu-img check): a header with
// no refcount table (refcount_table_clusters 0) is accepted so that a repair
// can rebuild one, and the snapshot table is left to the checker, which
// validates it itself (qcow2_check_read_snapshot_table()).
enum class HeaderUse { kOpen, kCheck };

// Parses and validates the header in `first_cluster`: the first bytes of the
// image (at least 72; callers pass min(file length, 2 MiB) so that the whole
// first cluster of any valid image is present).
Result<Header> parse_header(std::span<const uint8_t> first_cluster, HeaderUse use = HeaderUse::kOpen);

// QEMU's qcow2_validate_table() for the snapshot table: nb_snapshots within
// 65536 and snapshots_offset cluster-aligned with the table's minimal extent
// (40 bytes an entry) below the largest image offset, checked even when
// there are no snapshots, as QEMU checks it. Errors name the field.
Status validate_snapshot_table_pointer(const Header& h);

// Where uqcow is deliberately stricter than QEMU's open: checks the tables
// the header points at against the file (`file_length` bytes) and against
// each other. QEMU reads a table lying (partly) beyond the end of the file
// as zeros, and accepts a refcount table over the header (e.g.
// refcount_table_offset 0); the first allocation then writes refcounts over
// the header. Refused here, naming the field:
//   - the active L1 table (l1_table_offset) or the snapshot table's minimal
//     extent (snapshots_offset, 40 bytes an entry) beyond the end of the file;
//   - with `read_write` (the only opens that use the refcount table): the
//     refcount table beyond the end of the file, or overlapping the header
//     cluster, the active L1 table or the snapshot table; the active L1
//     table overlapping the header cluster.
// qemu-img check still opens such images (`uqcow check` reads them as QEMU
// does, through check_image(), which does not call this).
Status validate_table_placement(const Header& h, uint64_t file_length, bool read_write);

// Serialises `h` (header, extensions, backing file name) into a buffer of
// h.cluster_size() bytes laid out as QEMU writes it. Fails with EINVAL if the
// result does not fit in the first cluster.
Result<std::vector<uint8_t>> serialize_header(const Header& h);

// Minimum L1 entries to map `size` bytes of guest space.
uint64_t l1_entries_for(uint64_t size, const Geometry& g);

}  // namespace uqcow::qcow2
