#include "qcow2/create_options.h"

#include <sstream>

#include "block/options.h"

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
    UQ_ASSIGN_OR_RETURN(bool v, parse_flag(key, value));
    o.encryption = v ? CryptMethod::kAes : CryptMethod::kNone;
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
    UQ_ASSIGN_OR_RETURN(uint64_t v, parse_size(value, key));
    if (v == 0 || v > 3600000) return Error(EINVAL, key + ": must be 1..3600000 milliseconds");
    o.luks.iter_time_ms = v;
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
      UQ_ASSIGN_OR_RETURN(o.size, parse_size(value, key));
    } else if (key == "cluster_size") {
      UQ_ASSIGN_OR_RETURN(uint64_t v, parse_size(value, key));
      if (v < 512 || v > (2u << 20) || (v & (v - 1))) {
        return Error(EINVAL, "cluster_size: must be a power of two between 512 and 2M");
      }
      o.cluster_size = static_cast<uint32_t>(v);
    } else if (key == "compat") {
      if (value == "0.10" || value == "v2") o.version = 2;
      else if (value == "1.1" || value == "v3") o.version = 3;
      else return Error(EINVAL, "compat: '" + value + "' is not 0.10 or 1.1");
    } else if (key == "refcount_bits") {
      UQ_ASSIGN_OR_RETURN(uint64_t v, parse_size(value, key));
      if (v == 0 || v > 64 || (v & (v - 1))) return Error(EINVAL, "refcount_bits: must be a power of two up to 64");
      o.refcount_bits = static_cast<uint32_t>(v);
    } else if (key == "lazy_refcounts") {
      UQ_ASSIGN_OR_RETURN(o.lazy_refcounts, parse_flag(key, value));
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
      UQ_ASSIGN_OR_RETURN(o.extended_l2, parse_flag(key, value));
    } else if (key == "data_file") {
      o.data_file = value;
    } else if (key == "data_file_raw") {
      UQ_ASSIGN_OR_RETURN(o.data_file_raw, parse_flag(key, value));
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

}  // namespace uqcow::qcow2
