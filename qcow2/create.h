// Creating qcow2 images with qemu-img's option names.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "engine/result.h"
#include "engine/task.h"
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

// Creates (or truncates) `path` as an empty qcow2 image, then preallocates
// as asked. The size is rounded up to a multiple of 512, as qemu-img does.
// The image passes `qemu-img check` clean.
Task<Status> create_image(const std::string& path, const CreateOptions& o);

}  // namespace uqcow::qcow2
