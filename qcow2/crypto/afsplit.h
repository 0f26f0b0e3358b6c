// LUKS anti-forensic splitting (QEMU's crypto/afsplit.c, cryptsetup's af.c):
// a key of `block` bytes is stored as `stripes` blocks whose recombination
// needs every one of them, so wiping any part of a key slot destroys it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "engine/result.h"

typedef struct evp_md_st EVP_MD;

namespace uqcow::qcow2::crypto {

// Splits `key` into out (stripes * key.size() bytes), the first stripes - 1
// blocks random. EINVAL on size mismatch, EIO if OpenSSL fails.
Status af_split(const EVP_MD* hash, uint32_t stripes, std::span<const uint8_t> key, std::span<uint8_t> out);

// Recombines `in` (stripes * key.size() bytes) into `key`.
Status af_merge(const EVP_MD* hash, uint32_t stripes, std::span<const uint8_t> in, std::span<uint8_t> key);

}  // namespace uqcow::qcow2::crypto
