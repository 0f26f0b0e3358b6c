#include "qcow2/create.h"

#include <sstream>
#include <vector>

#include "block/endian.h"
#include "block/options.h"
#include "block/path.h"
#include "qcow2/header.h"
#include "qcow2/image.h"
#include "qcow2/refcount_entry.h"
#include "uring/raw_file.h"

namespace uqcow::qcow2 {
namespace {

Result<bool> parse_flag(const std::string& key, const std::string& v) {
  if (v == "on" || v == "true" || v == "yes") return true;
  if (v == "off" || v == "false" || v == "no") return false;
  return Error(EINVAL, key + ": '" + v + "' is not on/off");
}

// qemu-img's encrypt.* options (QCryptoBlockCreateOptionsLUKS). The secret
// itself never comes from -o: encrypt.key-secret is accepted and ignored,
// the passphrase comes from --passphrase-file.
Status parse_encrypt_option(const std::string& key, const std::string& value, CreateOptions& o) {
  crypto::CipherSpec& spec = o.luks.spec;
  if (key == "encrypt.format") {
    if (value == "luks") o.encryption = CryptMethod::kLuks;
    else if (value == "aes") o.encryption = CryptMethod::kAes;
    else return Error(EINVAL, key + ": '" + value + "' is not luks or aes");
  } else if (key == "encryption") {
    // QEMU's deprecated boolean: legacy AES.
    auto v = parse_flag(key, value);
    if (!v.ok()) return std::move(v).error();
    o.encryption = *v ? CryptMethod::kAes : CryptMethod::kNone;
  } else if (key == "encrypt.cipher-alg") {
    if (value == "aes-128") spec.alg = crypto::CipherAlg::kAes128;
    else if (value == "aes-256") spec.alg = crypto::CipherAlg::kAes256;
    else return Error(EINVAL, key + ": '" + value + "' is not aes-128 or aes-256");
  } else if (key == "encrypt.cipher-mode") {
    if (value == "xts") spec.mode = crypto::CipherMode::kXts;
    else if (value == "cbc") spec.mode = crypto::CipherMode::kCbc;
    else return Error(EINVAL, key + ": '" + value + "' is not xts or cbc");
  } else if (key == "encrypt.ivgen-alg") {
    if (value == "plain64") spec.ivgen = crypto::IvGen::kPlain64;
    else if (value == "plain") spec.ivgen = crypto::IvGen::kPlain;
    else if (value == "essiv") spec.ivgen = crypto::IvGen::kEssiv;
    else return Error(EINVAL, key + ": '" + value + "' is not plain64, plain or essiv");
  } else if (key == "encrypt.ivgen-hash-alg") {
    if (value != "sha256") return Error(EINVAL, key + ": only sha256 is supported");
  } else if (key == "encrypt.hash-alg") {
    if (value != "sha1" && value != "sha256" && value != "sha512") {
      return Error(EINVAL, key + ": '" + value + "' is not sha1, sha256 or sha512");
    }
    o.luks.hash = value;
  } else if (key == "encrypt.iter-time") {
    auto v = parse_size(value, key);
    if (!v.ok()) return std::move(v).error();
    if (*v == 0 || *v > 3600000) return Error(EINVAL, key + ": must be 1..3600000 milliseconds");
    o.luks.iter_time_ms = *v;
  } else if (key != "encrypt.key-secret") {
    return Error(EINVAL, "unknown option '" + key + "' for qcow2 create");
  }
  return Status();
}

}  // namespace

Status parse_create_options(const std::string& list, CreateOptions& o) {
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    auto eq = item.find('=');
    std::string key = item.substr(0, eq);
    std::string value = eq == std::string::npos ? "on" : item.substr(eq + 1);
    if (key == "size") {
      auto v = parse_size(value, key);
      if (!v.ok()) return std::move(v).error();
      o.size = *v;
    } else if (key == "cluster_size") {
      auto v = parse_size(value, key);
      if (!v.ok()) return std::move(v).error();
      if (*v < 512 || *v > (2u << 20) || (*v & (*v - 1))) {
        return Error(EINVAL, "cluster_size: must be a power of two between 512 and 2M");
      }
      o.cluster_size = static_cast<uint32_t>(*v);
    } else if (key == "compat") {
      if (value == "0.10" || value == "v2") o.version = 2;
      else if (value == "1.1" || value == "v3") o.version = 3;
      else return Error(EINVAL, "compat: '" + value + "' is not 0.10 or 1.1");
    } else if (key == "refcount_bits") {
      auto v = parse_size(value, key);
      if (!v.ok()) return std::move(v).error();
      if (*v == 0 || *v > 64 || (*v & (*v - 1))) return Error(EINVAL, "refcount_bits: must be a power of two up to 64");
      o.refcount_bits = static_cast<uint32_t>(*v);
    } else if (key == "lazy_refcounts") {
      auto v = parse_flag(key, value);
      if (!v.ok()) return std::move(v).error();
      o.lazy_refcounts = *v;
    } else if (key == "preallocation") {
      if (value == "off") o.preallocation = Preallocation::kOff;
      else if (value == "metadata") o.preallocation = Preallocation::kMetadata;
      else if (value == "falloc") o.preallocation = Preallocation::kFalloc;
      else if (value == "full") o.preallocation = Preallocation::kFull;
      else return Error(EINVAL, "preallocation: '" + value + "' is not off, metadata, falloc or full");
    } else if (key == "compression_type") {
      if (value == "zlib") o.compression_type = CompressionType::kZlib;
      else if (value == "zstd") o.compression_type = CompressionType::kZstd;
      else return Error(EINVAL, "compression_type: '" + value + "' is not zlib or zstd");
    } else if (key == "extended_l2") {
      auto v = parse_flag(key, value);
      if (!v.ok()) return std::move(v).error();
      o.extended_l2 = *v;
    } else if (key == "data_file") {
      o.data_file = value;
    } else if (key == "data_file_raw") {
      auto v = parse_flag(key, value);
      if (!v.ok()) return std::move(v).error();
      o.data_file_raw = *v;
    } else if (key == "backing_file") {
      o.backing_file = value;
    } else if (key == "backing_fmt") {
      o.backing_format = value;
    } else if (key.rfind("encrypt.", 0) == 0 || key == "encryption") {
      UQ_TRY(parse_encrypt_option(key, value, o));
    } else {
      return Error(EINVAL, "unknown option '" + key + "' for qcow2 create");
    }
  }
  return Status();
}

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

Task<Status> create_image(const std::string& path, const CreateOptions& requested) {
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
    auto luks = crypto::luks_create(o.luks, o.passphrase);
    if (!luks.ok()) co_return std::move(luks).error();
    crypto_area = std::move(luks->area);  // the master key is wiped with `luks`
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

  auto header = serialize_header(h);
  if (!header.ok()) co_return std::move(header).error();
  std::vector<uint8_t> image(total * cs, 0);
  std::copy(header->begin(), header->end(), image.begin());
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
    auto file = RawFile::open(path, fo);
    if (!file.ok()) co_return std::move(file).error();
    UQ_CO_TRY((*file)->truncate(0));
    UQ_CO_TRY(co_await (*file)->co_write(0, bytes_of(image)));
    UQ_CO_TRY(co_await (*file)->co_flush());
    if (!o.data_file.empty()) {
      // Created as qemu-img creates it: emptied, then sized to the disk
      // (sparse), raw or not.
      auto df = RawFile::open(resolve_relative(path, o.data_file), fo);
      if (!df.ok()) co_return std::move(df).error().with_context("data_file");
      UQ_CO_TRY((*df)->truncate(0));
      UQ_CO_TRY((*df)->truncate(o.size));
    }
  }
  // QEMU's qcow2_co_create: a raw data file must read as the disk whether
  // or not the metadata is looked at, so its L2 tables map every cluster
  // 1:1 from the start (preallocation=metadata at least).
  const Preallocation prealloc =
      o.data_file_raw && o.preallocation == Preallocation::kOff ? Preallocation::kMetadata : o.preallocation;
  if (prealloc == Preallocation::kOff) co_return Status();

  // Opened as open_disk() (block/open.h) opens a qcow2 image, less the
  // backing file, which preallocation does not read.
  OpenOptions open_options;
  open_options.read_only = false;
  open_options.no_backing = true;
  auto file = RawFile::open(path, {.read_only = false,
                                   .cache = open_options.cache,
                                   .lock = lock_perms(open_options, LockedFile::kQcow2Image)});
  if (!file.ok()) co_return std::move(file).error();
  auto img = co_await Qcow2Image::open(std::move(file).value(), open_options, nullptr);
  if (!img.ok()) co_return std::move(img).error();
  Status s = co_await (*img)->preallocate(prealloc);
  Status c = co_await (*img)->close();
  co_return s.ok() ? c : s;
}

}  // namespace uqcow::qcow2
