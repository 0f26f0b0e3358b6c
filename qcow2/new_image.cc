#include "qcow2/new_image.h"

#include <vector>

#include "block/endian.h"
#include "block/options.h"
#include "block/path.h"
#include "qcow2/header.h"
#include "qcow2/refcount_entry.h"
#include "uring/raw_file.h"

namespace uqcow::qcow2 {

namespace {

Status validate(const CreateOptions& o) {
  if (o.version == 2) {
    if (o.refcount_bits != 16) return Error(EINVAL, "refcount_bits: compat=0.10 images only support 16");
    if (o.lazy_refcounts) return Error(EINVAL, "lazy_refcounts: needs compat=1.1");
    if (o.extended_l2) return Error(EINVAL, "extended_l2: needs compat=1.1");
    if (!o.data_file.empty()) return Error(EINVAL, "data_file: needs compat=1.1");
    if (o.compression_type != CompressionType::kZlib) return Error(EINVAL, "compression_type: needs compat=1.1");
  }
  if (o.extended_l2 && o.cluster_size < (1u << kMinExtendedL2ClusterBits)) {
    return Error(EINVAL, "extended_l2: needs cluster_size >= 16k");
  }
  if (o.data_file_raw && o.data_file.empty()) return Error(EINVAL, "data_file_raw: needs data_file");
  if (o.data_file_raw && !o.backing_file.empty()) {
    // QEMU: "Backing file and data-file-raw cannot be used at the same time".
    return Error(EINVAL, "data_file_raw: cannot be combined with a backing file");
  }
  if (!o.backing_file.empty() && o.preallocation != Preallocation::kOff) {
    return Error(EINVAL, "preallocation: cannot be combined with a backing file");
  }
  if (!o.backing_format.empty() && o.backing_format != "qcow2" && o.backing_format != "raw") {
    return Error(EINVAL, "backing_fmt: '" + o.backing_format + "' is not supported (qcow2, raw)");
  }
  if (o.encryption != CryptMethod::kNone) {
    if (o.passphrase.empty()) {
      return Error(EINVAL, "encrypt.format: an encrypted image needs a passphrase: give it with --passphrase-file");
    }
    // Preallocated clusters would hold plaintext zeros that decrypt to noise.
    if (o.preallocation != Preallocation::kOff) return Error(EINVAL, "preallocation: cannot be combined with encryption");
    if (o.data_file_raw) return Error(EINVAL, "data_file_raw: cannot be combined with encryption");
  }
  return Status();
}

std::span<const std::byte> bytes_of(const std::vector<uint8_t>& v) {
  return {reinterpret_cast<const std::byte*>(v.data()), v.size()};
}

}  // namespace

Task<Status> write_new_image(const std::string& path, const CreateOptions& requested) {
  // qemu-img creates qcow2 images of whole sectors, rounding the size up
  // (qcow2_co_create_opts); the data of a raw external data file too.
  CreateOptions o = requested;
  if (o.size > uint64_t{INT64_MAX}) co_return Error(EFBIG, "size: must be less than 8 EiB");
  o.size = (o.size + kSectorSize - 1) / kSectorSize * kSectorSize;
  UQ_CO_TRY(validate(o));
  Header h;
  h.version = o.version;
  h.cluster_bits = static_cast<uint32_t>(__builtin_ctz(o.cluster_size));
  h.size = o.size;
  h.refcount_order = static_cast<uint32_t>(__builtin_ctz(o.refcount_bits));
  if (o.version >= 3) {
    if (o.lazy_refcounts) h.compatible_features |= kCompatLazyRefcounts;
    if (o.compression_type == CompressionType::kZstd) {
      h.incompatible_features |= kIncompatCompression;
      h.compression_type = CompressionType::kZstd;
    }
    if (o.extended_l2) h.incompatible_features |= kIncompatExtendedL2;
    if (!o.data_file.empty()) {
      h.incompatible_features |= kIncompatDataFile;
      h.data_file = o.data_file;
      if (o.data_file_raw) h.autoclear_features |= kAutoclearDataFileRaw;
    }
    // The feature name table QEMU writes, so tools can name our bits.
    h.feature_names = {{0, 0, "dirty bit"},          {0, 1, "corrupt bit"},
                       {0, 2, "external data file"}, {0, 3, "compression type"},
                       {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
                       {2, 0, "bitmaps"},            {2, 1, "raw external data"}};
  }
  h.backing_file = o.backing_file;
  if (!o.backing_file.empty() && !o.backing_format.empty()) h.backing_format = o.backing_format;
  const Geometry g = h.geometry();
  const uint64_t cs = g.cluster_size;
  h.crypt_method = o.encryption;
  std::vector<uint8_t> crypto_area;  // the LUKS header and key material
  if (o.encryption == CryptMethod::kLuks) {
    UQ_CO_ASSIGN_OR_RETURN(auto luks, crypto::luks_create(o.luks, o.passphrase));
    crypto_area = std::move(luks.area);  // the master key is wiped with `luks`
  }
  const uint64_t crypto_clusters = (crypto_area.size() + cs - 1) / cs;

  // Layout: header | refcount table | refcount blocks | L1 table | LUKS
  // area, sized to a fixed point (the blocks must count every cluster).
  h.l1_size = static_cast<uint32_t>(l1_entries_for(o.size, g));
  if (uint64_t{h.l1_size} * 8 > kMaxL1Bytes) co_return Error(EFBIG, "size: too large for this cluster size");
  const uint64_t l1_clusters = (uint64_t{h.l1_size} * 8 + cs - 1) / cs;
  const uint64_t per_block = cs * 8 / o.refcount_bits;
  uint64_t blocks = 1, table_clusters = 1;
  for (int i = 0; i < 64; ++i) {
    uint64_t total = 1 + table_clusters + blocks + l1_clusters + crypto_clusters;
    uint64_t nb = (total + per_block - 1) / per_block;
    uint64_t nt = (nb * 8 + cs - 1) / cs;
    if (nb == blocks && nt == table_clusters) break;
    blocks = nb;
    table_clusters = nt;
  }
  const uint64_t total = 1 + table_clusters + blocks + l1_clusters + crypto_clusters;
  h.refcount_table_offset = cs;
  h.refcount_table_clusters = static_cast<uint32_t>(table_clusters);
  h.l1_table_offset = (1 + table_clusters + blocks) * cs;
  const uint64_t crypto_offset = h.l1_table_offset + l1_clusters * cs;
  if (!crypto_area.empty()) h.crypto_header = CryptoHeaderExtension{crypto_offset, crypto_area.size()};

  UQ_CO_ASSIGN_OR_RETURN(auto header, serialize_header(h));
  std::vector<uint8_t> image(total * cs, 0);
  std::copy(header.begin(), header.end(), image.begin());
  std::copy(crypto_area.begin(), crypto_area.end(), image.begin() + crypto_offset);
  for (uint64_t b = 0; b < blocks; ++b) {
    store_be64(&image[cs + b * 8], (1 + table_clusters + b) * cs);
  }
  for (uint64_t c = 0; c < total; ++c) {
    uint8_t* block = &image[(1 + table_clusters + c / per_block) * cs];
    set_refcount_entry(block, c % per_block, h.refcount_order, 1);
  }

  {
    // QEMU's creation locks: an image another process uses is not truncated.
    // Released at the end of this scope, before the image opens below.
    RawFileOptions fo{.read_only = false, .create = true, .lock = kCreateLockPerms};
    UQ_CO_ASSIGN_OR_RETURN(auto file, RawFile::open(path, fo));
    UQ_CO_TRY(file->truncate(0));
    UQ_CO_TRY(co_await file->co_write(0, bytes_of(image)));
    UQ_CO_TRY(co_await file->co_flush());
    if (!o.data_file.empty()) {
      // Created as qemu-img creates it: emptied, then sized to the disk
      // (sparse), raw or not.
      auto df = RawFile::open(resolve_relative(path, o.data_file), fo);
      if (!df.ok()) co_return std::move(df).error().with_context("data_file");
      UQ_CO_TRY((*df)->truncate(0));
      UQ_CO_TRY((*df)->truncate(o.size));
    }
  }
  co_return Status();
}

}  // namespace uqcow::qcow2
