// qemu-img create's options for qcow2 (-o ...), parsed and named as qemu-img
// names them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "engine/result.h"
#include "qcow2/crypto/luks.h"
#include "qcow2/format.h"

namespace uqcow::qcow2 {

enum class Preallocation { kOff, kMetadata, kFalloc, kFull };

struct CreateOptions {
  uint64_t size = 0;
  uint32_t cluster_size = 65536;
  uint32_t version = 3;            // compat=1.1 -> 3, compat=0.10 -> 2
  uint32_t refcount_bits = 16;
  bool lazy_refcounts = false;
  Preallocation preallocation = Preallocation::kOff;
  CompressionType compression_type = CompressionType::kZlib;
  bool extended_l2 = false;
  std::string data_file;           // external data file name ("" = none)
  bool data_file_raw = false;
  std::string backing_file;
  std::string backing_format;
  // encrypt.format: kLuks (the header goes into refcounted clusters named
  // by the FDE extension, as QEMU does) or kAes (legacy; explicit only).
  CryptMethod encryption = CryptMethod::kNone;
  crypto::LuksCreateOptions luks;  // encrypt.cipher-alg, cipher-mode, ...
  std::string passphrase;          // from --passphrase-file, never from -o
};

// Parses qemu-img's -o list ("cluster_size=64k,compat=1.1,...") into `o`.
// Unknown keys and bad values are errors naming the key.
Status parse_create_options(const std::string& list, CreateOptions& o);

}  // namespace uqcow::qcow2
