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

// Parses and validates the header in `first_cluster`: the first bytes of the
// image (at least 72; callers pass min(file length, 2 MiB) so that the whole
// first cluster of any valid image is present).
Result<Header> parse_header(std::span<const uint8_t> first_cluster);

// Serialises `h` (header, extensions, backing file name) into a buffer of
// h.cluster_size() bytes laid out as QEMU writes it. Fails with EINVAL if the
// result does not fit in the first cluster.
Result<std::vector<uint8_t>> serialize_header(const Header& h);

// Minimum L1 entries to map `size` bytes of guest space.
uint64_t l1_entries_for(uint64_t size, const Geometry& g);

}  // namespace uqcow::qcow2
