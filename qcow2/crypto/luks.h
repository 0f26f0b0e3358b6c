// LUKS version 1 headers as QEMU stores them inside qcow2 (crypt_method 2):
// parse and validate, unlock a key slot with a passphrase, create.
//
// Layout (all big-endian; QEMU's crypto/block-luks.c, LUKS1 on-disk spec):
//   0   magic "LUKS\xba\xbe"     6   version (1)
//   8   cipher_name[32] "aes"   40   cipher_mode[32] "xts-plain64"
//   72  hash_spec[32] "sha256" 104   payload_offset (sectors)
//   108 key_bytes              112   mk_digest[20]
//   132 mk_digest_salt[32]     164   mk_digest_iterations
//   168 uuid[40]               208   8 key slots of 48 bytes:
//       active, iterations, salt[32], key_offset (sectors), stripes
// A slot's key material (key_bytes * stripes bytes, AF-split, encrypted with
// the PBKDF2 passphrase key, sectors numbered from 0) lies at key_offset.
//
// Every field is untrusted: parse_luks_header() refuses anything outside the
// area or beyond fixed maxima (PBKDF2 iterations, stripes, key size) with an
// error naming the field, before any allocation sized by it.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "engine/result.h"
#include "qcow2/crypto/sector_cipher.h"

namespace uqcow::qcow2::crypto {

inline constexpr size_t kLuksHeaderBytes = 592;
inline constexpr size_t kLuksSlots = 8;
inline constexpr uint32_t kLuksStripes = 4000;            // QEMU accepts only this
inline constexpr uint32_t kLuksSlotActive = 0x00AC71F3;
inline constexpr uint32_t kLuksSlotInactive = 0x0000DEAD;
// A PBKDF2 count above this would stall open for minutes: refused.
inline constexpr uint32_t kLuksMaxIterations = 1u << 24;
inline constexpr uint32_t kLuksMinIterations = 1000;      // QEMU's minimum on create

struct LuksKeySlot {
  uint32_t active = kLuksSlotInactive;
  uint32_t iterations = 0;
  std::array<uint8_t, 32> salt{};
  uint32_t key_offset = 0;  // sectors from the start of the header area
  uint32_t stripes = kLuksStripes;
};

struct LuksHeader {
  std::string cipher_name;  // "aes"
  std::string cipher_mode;  // "xts-plain64", "cbc-essiv:sha256"
  std::string hash_spec;    // "sha256"
  uint32_t payload_offset = 0;
  uint32_t key_bytes = 0;
  std::array<uint8_t, 20> mk_digest{};
  std::array<uint8_t, 32> mk_digest_salt{};
  uint32_t mk_digest_iterations = 0;
  std::string uuid;
  std::array<LuksKeySlot, kLuksSlots> slots;

  CipherSpec spec;          // decoded from cipher_name/mode and key_bytes
};

// Parses the header at the start of `area` (the qcow2 FDE area) and checks
// that every active slot's key material lies inside it. EINVAL naming the
// field; ENOTSUP for a cipher or hash this implementation lacks.
Result<LuksHeader> parse_luks_header(std::span<const uint8_t> area);

// The 592 header bytes of `h`.
std::vector<uint8_t> serialize_luks_header(const LuksHeader& h);

// Tries the passphrase on every active slot and returns the master key whose
// digest matches. EPERM "invalid passphrase" if no slot opens.
Result<SecretBytes> luks_unlock(const LuksHeader& h, std::span<const uint8_t> area,
                                std::string_view passphrase);

struct LuksCreateOptions {
  CipherSpec spec;               // default aes-256-xts-plain64
  std::string hash = "sha256";   // PBKDF2 and AF hash: sha1, sha256, sha512
  uint64_t iter_time_ms = 2000;  // PBKDF2 time for the key slot, as QEMU
};

struct LuksCreated {
  std::vector<uint8_t> area;  // header + key material; its size = payload offset
  SecretBytes master_key;
};

// A new header with slot 0 holding a random master key under `passphrase`,
// laid out as QEMU does (slot material 4 KiB aligned from 4 KiB).
Result<LuksCreated> luks_create(const LuksCreateOptions& o, std::string_view passphrase);

}  // namespace uqcow::qcow2::crypto
