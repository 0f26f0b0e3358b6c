#include "qcow2/header.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>

#include "block/endian.h"
#include "qcow2/hex.h"

namespace uqcow::qcow2 {
namespace {

Error invalid(const std::string& field, const std::string& problem) {
  return Error(EINVAL, "invalid qcow2 image: " + field + ": " + problem);
}


constexpr uint32_t kHeaderWithCompression = 112;  // 105 rounded up to 8

Status validate_table(const std::string& name, uint64_t offset, uint64_t bytes,
                      uint64_t cluster_size) {
  if (offset & (cluster_size - 1)) {
    return invalid(name + "_offset", hex(offset) + " is not aligned to the cluster size");
  }
  if (offset + bytes < offset || offset + bytes > (1ull << 56)) {
    return invalid(name + "_offset", hex(offset) + " + " + std::to_string(bytes) +
                                         " bytes is beyond the largest image offset");
  }
  return Status();
}

std::string incompatible_names(const Header& h, uint64_t bits) {
  std::string out;
  for (uint8_t bit = 0; bit < 64; ++bit) {
    if (!(bits & (1ull << bit))) continue;
    if (!out.empty()) out += ", ";
    auto name = h.feature_name(0, bit);
    out += name ? "'" + *name + "'" : "bit " + std::to_string(bit);
  }
  return out;
}

// The bitmaps extension's checks in qcow2_read_extensions().
Status validate_bitmaps(const BitmapsExtension& b, uint32_t reserved, const Header& h) {
  constexpr uint32_t kMaxBitmaps = 65535;                           // QCOW2_MAX_BITMAPS
  constexpr uint64_t kMaxDirectoryBytes = uint64_t{1024} * kMaxBitmaps;  // QCOW2_MAX_BITMAP_DIRECTORY_SIZE
  if (reserved != 0) return invalid("bitmaps extension", "reserved field is not zero");
  if (b.nb_bitmaps > kMaxBitmaps) {
    return invalid("nb_bitmaps", std::to_string(b.nb_bitmaps) + " exceeds the maximum of 65535");
  }
  if (b.nb_bitmaps == 0) return invalid("nb_bitmaps", "0 in a bitmaps extension");
  if (b.directory_offset & (h.cluster_size() - 1)) {
    return invalid("bitmap_directory_offset", hex(b.directory_offset) + " is not aligned to the cluster size");
  }
  if (b.directory_size > kMaxDirectoryBytes) {
    return invalid("bitmap_directory_size", std::to_string(b.directory_size) + " exceeds the maximum of " +
                                                std::to_string(kMaxDirectoryBytes));
  }
  return Status();
}

Status parse_extensions(std::span<const uint8_t> buf, size_t start, size_t end, Header& h) {
  size_t pos = start;
  while (true) {
    if (pos + 8 > end) {
      // QEMU accepts a missing end marker when the extension area is full.
      if (pos == end || pos + 8 > buf.size()) break;
      return invalid("header extension", "truncated extension header at offset " + hex(pos));
    }
    uint32_t type = load_be32(&buf[pos]);
    uint32_t len = load_be32(&buf[pos + 4]);
    pos += 8;
    if (type == kExtEnd) break;
    if (len > end - pos) {
      return invalid("header extension " + hex(type),
                     "length " + std::to_string(len) + " runs past the end of the header cluster");
    }
    if (len > kMaxExtensionBytes) {
      return invalid("header extension " + hex(type), "length " + std::to_string(len) + " too large");
    }
    const uint8_t* d = &buf[pos];
    switch (type) {
      case kExtBackingFormat:
        // QEMU keeps the name in a 16-byte buffer and refuses a longer one
        // ("ext_backing_format: len=N too large (>=16)").
        if (len >= 16) {
          return invalid("backing format extension", "length " + std::to_string(len) +
                                                         " is too large (at most 15)");
        }
        h.backing_format = std::string(reinterpret_cast<const char*>(d), len);
        if (h.backing_format->find('\0') != std::string::npos) {
          h.backing_format->resize(h.backing_format->find('\0'));
        }
        break;
      case kExtFeatureTable:
        for (size_t i = 0; i + 48 <= len; i += 48) {
          FeatureName f;
          f.type = d[i];
          f.bit = d[i + 1];
          const char* name = reinterpret_cast<const char*>(d + i + 2);
          f.name.assign(name, strnlen(name, 46));
          h.feature_names.push_back(std::move(f));
        }
        break;
      case kExtBitmaps: {
        BitmapsExtension b;
        if (len != 24) return invalid("bitmaps extension", "length " + std::to_string(len) + " is not 24");
        b.nb_bitmaps = load_be32(d);
        b.directory_size = load_be64(d + 8);
        b.directory_offset = load_be64(d + 16);
        // QEMU validates the extension only while the bitmaps autoclear bit
        // says it is consistent; without the bit it is dropped on a write.
        if (h.autoclear_features & kAutoclearBitmaps) UQ_TRY(validate_bitmaps(b, load_be32(d + 4), h));
        h.bitmaps = b;
        break;
      }
      case kExtCryptoHeader: {
        if (h.crypt_method != CryptMethod::kLuks) {
          return invalid("full disk encryption header extension",
                         "only expected with LUKS encryption (crypt_method 2)");
        }
        if (len != 16) {
          return invalid("full disk encryption header extension",
                         "length " + std::to_string(len) + " is not 16");
        }
        CryptoHeaderExtension c{load_be64(d), load_be64(d + 8)};
        if (c.offset & (h.cluster_size() - 1)) {
          return invalid("crypto header offset", hex(c.offset) + " is not cluster aligned");
        }
        if (c.length > (16ull << 20) || c.offset + c.length < c.offset) {
          return invalid("crypto header length", std::to_string(c.length) + " is too large");
        }
        h.crypto_header = c;
        break;
      }
      case kExtDataFile:
        h.data_file = std::string(reinterpret_cast<const char*>(d), strnlen(reinterpret_cast<const char*>(d), len));
        break;
      default:
        h.unknown_extensions.push_back({type, std::vector<uint8_t>(d, d + len)});
        break;
    }
    pos += (len + 7) & ~size_t{7};
  }
  return Status();
}

Status validate_features(Header& h) {
  uint64_t unknown = h.incompatible_features & ~kIncompatKnown;
  if (unknown) {
    return Error(ENOTSUP, "unsupported qcow2 image: incompatible_features: unknown feature(s) " +
                              incompatible_names(h, unknown));
  }
  // QEMU's validate_compression_type(): the bit is set exactly when the type
  // is not zlib. A header too short for the field means zlib.
  if (h.incompatible_features & kIncompatCompression) {
    if (h.header_length <= kOffCompressionType) {
      return invalid("header_length", "compression type bit set but the header has no "
                                      "compression_type field");
    }
    if (h.compression_type == CompressionType::kZlib) {
      return invalid("incompatible_features", "compression type bit set with compression_type zlib "
                                              "(the bit must only be set for a non-zlib type)");
    }
  } else if (h.compression_type != CompressionType::kZlib) {
    return invalid("compression_type", "non-zlib compression type without the incompatible "
                                       "feature bit");
  }
  if (h.extended_l2() && h.cluster_bits < kMinExtendedL2ClusterBits) {
    return invalid("cluster_bits", std::to_string(h.cluster_bits) +
                                       " is too small for extended L2 entries (minimum 14)");
  }
  if (h.has_data_file() && h.crypt_method != CryptMethod::kNone && h.data_file_raw()) {
    return invalid("autoclear_features", "data_file_raw cannot be combined with encryption");
  }
  if (!h.has_data_file() && h.data_file_raw()) {
    // QEMU 7.2 refuses to open such an image ("data-file-raw requires a data
    // file"; only qemu-img info, which opens no data file, shows it).
    return invalid("autoclear_features", "data_file_raw is set but the image has no external data file");
  }
  if (h.has_data_file() && !h.data_file) {
    return invalid("data file", "external data file feature set but no data file name "
                                "extension (0x44415441) is present");
  }
  return Status();
}

}  // namespace

std::optional<std::string> Header::feature_name(uint8_t type, uint8_t bit) const {
  for (const auto& f : feature_names) {
    if (f.type == type && f.bit == bit) return f.name;
  }
  return std::nullopt;
}

uint64_t l1_entries_for(uint64_t size, const Geometry& g) {
  uint64_t shift = g.cluster_bits + g.l2_bits;
  return (size + (1ull << shift) - 1) >> shift;
}

Status validate_snapshot_table_pointer(const Header& h) {
  if (h.nb_snapshots > kMaxSnapshots) {
    return invalid("nb_snapshots", std::to_string(h.nb_snapshots) + " exceeds the maximum of 65536");
  }
  return validate_table("snapshots", h.snapshots_offset, uint64_t{h.nb_snapshots} * 40, h.cluster_size());
}

Result<Header> parse_header(std::span<const uint8_t> buf, HeaderUse use) {
  if (buf.size() < kV2HeaderSize) {
    return invalid("header", "file is " + std::to_string(buf.size()) +
                                 " bytes, smaller than a qcow2 header (72)");
  }
  const uint8_t* b = buf.data();
  if (load_be32(b + kOffMagic) != kMagic) return invalid("magic", "not a qcow2 image");
  Header h;
  h.version = load_be32(b + kOffVersion);
  if (h.version != 2 && h.version != 3) {
    return Error(ENOTSUP, "unsupported qcow2 image: version: " + std::to_string(h.version) +
                              " (supported: 2, 3)");
  }
  h.backing_file_offset = load_be64(b + kOffBackingFileOffset);
  h.backing_file_size = load_be32(b + kOffBackingFileSize);
  h.cluster_bits = load_be32(b + kOffClusterBits);
  h.size = load_be64(b + kOffSize);
  uint32_t crypt = load_be32(b + kOffCryptMethod);
  h.l1_size = load_be32(b + kOffL1Size);
  h.l1_table_offset = load_be64(b + kOffL1TableOffset);
  h.refcount_table_offset = load_be64(b + kOffRefcountTableOffset);
  h.refcount_table_clusters = load_be32(b + kOffRefcountTableClusters);
  h.nb_snapshots = load_be32(b + kOffNbSnapshots);
  h.snapshots_offset = load_be64(b + kOffSnapshotsOffset);

  if (h.cluster_bits < kMinClusterBits || h.cluster_bits > kMaxClusterBits) {
    return invalid("cluster_bits", std::to_string(h.cluster_bits) + " is out of range 9..21");
  }
  const uint64_t cluster_size = h.cluster_size();

  if (h.version == 2) {
    h.header_length = kV2HeaderSize;
    h.refcount_order = 4;
  } else {
    if (buf.size() < kV3HeaderSize) return invalid("header_length", "file too short for a v3 header");
    h.incompatible_features = load_be64(b + kOffIncompatible);
    h.compatible_features = load_be64(b + kOffCompatible);
    h.autoclear_features = load_be64(b + kOffAutoclear);
    h.refcount_order = load_be32(b + kOffRefcountOrder);
    h.header_length = load_be32(b + kOffHeaderLength);
    if (h.header_length < kV3HeaderSize) {
      return invalid("header_length", std::to_string(h.header_length) + " is less than 104");
    }
    if (h.header_length > cluster_size) {
      return invalid("header_length", std::to_string(h.header_length) +
                                           " exceeds the cluster size " + std::to_string(cluster_size));
    }
    if (h.header_length > buf.size()) {
      return invalid("header_length", std::to_string(h.header_length) + " runs past the end of the file");
    }
    if (h.header_length > kOffCompressionType) {
      uint8_t ct = b[kOffCompressionType];
      if (ct > 1) {
        return Error(ENOTSUP, "unsupported qcow2 image: compression_type: unknown type " +
                                  std::to_string(ct));
      }
      h.compression_type = static_cast<CompressionType>(ct);
    }
    size_t known = h.header_length > kOffCompressionType ? kHeaderWithCompression : kV3HeaderSize;
    if (h.header_length > known) {
      h.extra_header_bytes.assign(b + known, b + h.header_length);
    }
  }
  if (h.refcount_order > 6) {
    return invalid("refcount_order", std::to_string(h.refcount_order) + " is out of range 0..6");
  }
  if (crypt > 2) return invalid("crypt_method", std::to_string(crypt) + " is unknown");
  h.crypt_method = static_cast<CryptMethod>(crypt);

  // Extensions sit between the header and the backing file name (or the end
  // of the first cluster).
  size_t ext_end = std::min<uint64_t>(cluster_size, buf.size());
  if (h.backing_file_offset != 0) {
    if (h.backing_file_offset > cluster_size ||
        h.backing_file_size > cluster_size - h.backing_file_offset) {
      return invalid("backing_file_offset", hex(h.backing_file_offset) +
                                                " puts the backing file name outside the first cluster");
    }
    if (h.backing_file_size > kMaxBackingFileName) {
      return invalid("backing_file_size", std::to_string(h.backing_file_size) +
                                              " exceeds the maximum of 1023");
    }
    if (h.backing_file_offset + h.backing_file_size > buf.size()) {
      return invalid("backing_file_offset", "backing file name runs past the end of the file");
    }
    if (h.backing_file_offset < h.header_length) {
      return invalid("backing_file_offset", hex(h.backing_file_offset) + " overlaps the header");
    }
    ext_end = std::min<uint64_t>(ext_end, h.backing_file_offset);
    h.backing_file.assign(reinterpret_cast<const char*>(b + h.backing_file_offset),
                          h.backing_file_size);
  }
  UQ_TRY(parse_extensions(buf, h.header_length, ext_end, h));
  UQ_TRY(validate_features(h));

  const Geometry g = h.geometry();
  // L1 table.
  if (uint64_t{h.l1_size} * 8 > kMaxL1Bytes) {
    return invalid("l1_size", std::to_string(h.l1_size) + " entries exceed the 32 MiB L1 limit");
  }
  if (h.size > (uint64_t{1} << 62) || l1_entries_for(h.size, g) > h.l1_size) {
    return invalid("l1_size", std::to_string(h.l1_size) + " entries are too few for size " +
                                  std::to_string(h.size));
  }
  // QEMU validates the offset even of an empty table.
  UQ_TRY(validate_table("l1_table", h.l1_table_offset, uint64_t{h.l1_size} * 8, cluster_size));
  // Refcount table.
  if (h.refcount_table_clusters == 0 && use != HeaderUse::kCheck) {
    return invalid("refcount_table_clusters", "0: an image needs a refcount table");
  }
  if (uint64_t{h.refcount_table_clusters} << h.cluster_bits > kMaxRefcountTableBytes) {
    return invalid("refcount_table_clusters", std::to_string(h.refcount_table_clusters) +
                                                  " clusters exceed the 8 MiB refcount table limit");
  }
  UQ_TRY(validate_table("refcount_table", h.refcount_table_offset,
                        uint64_t{h.refcount_table_clusters} << h.cluster_bits, cluster_size));
  if (use != HeaderUse::kCheck) UQ_TRY(validate_snapshot_table_pointer(h));
  return h;
}

namespace {

struct TableExtent {
  const char* field;  // the header field that places the table
  const char* what;
  uint64_t offset;
  uint64_t bytes;
  bool overlaps(const TableExtent& o) const {
    return bytes && o.bytes && offset < o.offset + o.bytes && o.offset < offset + bytes;
  }
};

Status beyond_end(const TableExtent& t, uint64_t file_length) {
  if (!t.bytes || t.offset + t.bytes <= file_length) return Status();
  return invalid(t.field, std::string("the ") + t.what + " (" + hex(t.offset) + ", " + std::to_string(t.bytes) +
                              " bytes) lies beyond the end of the file (" + std::to_string(file_length) +
                              " bytes); QEMU would read the missing part as zeros, uqcow refuses the image "
                              "(uqcow check reports it, as qemu-img check does)");
}

Status overlap(const TableExtent& t, const TableExtent& other) {
  if (!t.overlaps(other)) return Status();
  return invalid(t.field, std::string("the ") + t.what + " (" + hex(t.offset) + ", " + std::to_string(t.bytes) +
                              " bytes) overlaps the " + other.what + "; a write would damage it, so uqcow "
                              "refuses to open the image read-write (QEMU accepts it)");
}

}  // namespace

Status validate_table_placement(const Header& h, uint64_t file_length, bool read_write) {
  // parse_header bounded every offset + size below 2^56: no overflow here.
  const TableExtent header{"header", "header cluster", 0, h.cluster_size()};
  const TableExtent l1{"l1_table_offset", "active L1 table", h.l1_table_offset, uint64_t{h.l1_size} * 8};
  const TableExtent snapshots{"snapshots_offset", "snapshot table", h.snapshots_offset,
                              uint64_t{h.nb_snapshots} * 40};
  const TableExtent refcounts{"refcount_table_offset", "refcount table", h.refcount_table_offset,
                              uint64_t{h.refcount_table_clusters} << h.cluster_bits};
  UQ_TRY(beyond_end(l1, file_length));
  UQ_TRY(beyond_end(snapshots, file_length));
  if (!read_write) return Status();
  UQ_TRY(beyond_end(refcounts, file_length));
  UQ_TRY(overlap(refcounts, header));
  UQ_TRY(overlap(refcounts, l1));
  UQ_TRY(overlap(refcounts, snapshots));
  UQ_TRY(overlap(l1, header));
  return Status();
}

Result<std::vector<uint8_t>> serialize_header(const Header& h) {
  const uint64_t cluster_size = h.cluster_size();
  std::vector<uint8_t> out(cluster_size, 0);
  uint8_t* b = out.data();
  store_be32(b + kOffMagic, kMagic);
  store_be32(b + kOffVersion, h.version);
  store_be32(b + kOffClusterBits, h.cluster_bits);
  store_be64(b + kOffSize, h.size);
  store_be32(b + kOffCryptMethod, static_cast<uint32_t>(h.crypt_method));
  store_be32(b + kOffL1Size, h.l1_size);
  store_be64(b + kOffL1TableOffset, h.l1_table_offset);
  store_be64(b + kOffRefcountTableOffset, h.refcount_table_offset);
  store_be32(b + kOffRefcountTableClusters, h.refcount_table_clusters);
  store_be32(b + kOffNbSnapshots, h.nb_snapshots);
  store_be64(b + kOffSnapshotsOffset, h.snapshots_offset);
  size_t pos = kV2HeaderSize;
  if (h.version >= 3) {
    store_be64(b + kOffIncompatible, h.incompatible_features);
    store_be64(b + kOffCompatible, h.compatible_features);
    store_be64(b + kOffAutoclear, h.autoclear_features);
    store_be32(b + kOffRefcountOrder, h.refcount_order);
    b[kOffCompressionType] = static_cast<uint8_t>(h.compression_type);
    size_t header_length = kHeaderWithCompression + h.extra_header_bytes.size();
    std::copy(h.extra_header_bytes.begin(), h.extra_header_bytes.end(), b + kHeaderWithCompression);
    store_be32(b + kOffHeaderLength, static_cast<uint32_t>(header_length));
    pos = header_length;
  }
  auto put_ext = [&](uint32_t type, const uint8_t* data, size_t len) -> bool {
    size_t padded = (len + 7) & ~size_t{7};
    if (pos + 8 + padded > cluster_size) return false;
    store_be32(b + pos, type);
    store_be32(b + pos + 4, static_cast<uint32_t>(len));
    if (len) std::copy(data, data + len, b + pos + 8);
    pos += 8 + padded;
    return true;
  };
  auto too_big = [] { return Error(EINVAL, "qcow2 header and extensions exceed the first cluster"); };
  if (h.backing_format) {
    if (!put_ext(kExtBackingFormat, reinterpret_cast<const uint8_t*>(h.backing_format->data()),
                 h.backing_format->size()))
      return too_big();
  }
  if (h.data_file) {
    if (!put_ext(kExtDataFile, reinterpret_cast<const uint8_t*>(h.data_file->data()),
                 h.data_file->size()))
      return too_big();
  }
  if (h.crypto_header) {
    uint8_t d[16];
    store_be64(d, h.crypto_header->offset);
    store_be64(d + 8, h.crypto_header->length);
    if (!put_ext(kExtCryptoHeader, d, sizeof d)) return too_big();
  }
  if (h.bitmaps) {
    uint8_t d[24] = {};
    store_be32(d, h.bitmaps->nb_bitmaps);
    store_be64(d + 8, h.bitmaps->directory_size);
    store_be64(d + 16, h.bitmaps->directory_offset);
    if (!put_ext(kExtBitmaps, d, sizeof d)) return too_big();
  }
  if (!h.feature_names.empty()) {
    std::vector<uint8_t> table(h.feature_names.size() * 48, 0);
    for (size_t i = 0; i < h.feature_names.size(); ++i) {
      table[i * 48] = h.feature_names[i].type;
      table[i * 48 + 1] = h.feature_names[i].bit;
      std::copy_n(h.feature_names[i].name.begin(), std::min<size_t>(46, h.feature_names[i].name.size()),
                  table.begin() + i * 48 + 2);
    }
    if (!put_ext(kExtFeatureTable, table.data(), table.size())) return too_big();
  }
  for (const auto& u : h.unknown_extensions) {
    if (!put_ext(u.type, u.data.data(), u.data.size())) return too_big();
  }
  if (!put_ext(kExtEnd, nullptr, 0)) return too_big();
  if (!h.backing_file.empty()) {
    if (pos + h.backing_file.size() > cluster_size) return too_big();
    std::copy(h.backing_file.begin(), h.backing_file.end(), b + pos);
    store_be64(b + kOffBackingFileOffset, pos);
    store_be32(b + kOffBackingFileSize, static_cast<uint32_t>(h.backing_file.size()));
  }
  return out;
}

}  // namespace uqcow::qcow2
