// SectorCipher: a block cipher applied per 512-byte sector with a per-sector
// IV, as QEMU's qcrypto_block_cipher_{en,de}crypt_helper() does for LUKS and
// for qcow2's legacy AES. The cipher work is OpenSSL's EVP; this file only
// chooses the cipher and builds each sector's IV.
//
// Supported: AES-128/256 in XTS or CBC; IV generators plain (32-bit LE
// sector number), plain64 (64-bit LE) and essiv (the plain64 block
// encrypted with AES-256-ECB keyed by SHA-256 of the data key).
//
// Not thread-safe: one SectorCipher belongs to one reactor thread. Its two
// EVP contexts (encrypt, decrypt) are created once and reused for every
// sector; freeing them wipes the key schedules.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "engine/result.h"
#include "qcow2/crypto/secret.h"

typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;

namespace uqcow::qcow2::crypto {

inline constexpr uint64_t kSectorSize = 512;

enum class CipherAlg { kAes128, kAes256 };
enum class CipherMode { kXts, kCbc };
enum class IvGen { kPlain, kPlain64, kEssiv };

struct CipherSpec {
  CipherAlg alg = CipherAlg::kAes256;
  CipherMode mode = CipherMode::kXts;
  IvGen ivgen = IvGen::kPlain64;
  // essiv's hash is always sha256 here (the only one giving an AES key size
  // that QEMU pairs with AES: 32 bytes -> AES-256).

  // Key bytes the mode takes: XTS uses two keys of the algorithm's size.
  size_t key_bytes() const;
  // QEMU's names: "aes-256", "xts", "plain64".
  std::string alg_name() const;
  std::string mode_name() const;
  std::string ivgen_name() const;
};

class SectorCipher {
 public:
  // `key` has spec.key_bytes() bytes (EINVAL otherwise).
  static Result<std::unique_ptr<SectorCipher>> create(const CipherSpec& spec,
                                                      std::span<const uint8_t> key);
  ~SectorCipher();
  SectorCipher(const SectorCipher&) = delete;
  SectorCipher& operator=(const SectorCipher&) = delete;

  // En/decrypts `data` in place; its first byte is sector `first_sector`.
  // data.size() must be a multiple of 512 (EINVAL otherwise). EIO if OpenSSL
  // fails.
  Status encrypt(uint64_t first_sector, std::span<uint8_t> data);
  Status decrypt(uint64_t first_sector, std::span<uint8_t> data);

  const CipherSpec& spec() const { return spec_; }

 private:
  explicit SectorCipher(const CipherSpec& spec) : spec_(spec) {}
  Status run(EVP_CIPHER_CTX* ctx, uint64_t first_sector, std::span<uint8_t> data);
  Status make_iv(uint64_t sector, uint8_t iv[16]);

  CipherSpec spec_;
  EVP_CIPHER_CTX* enc_ = nullptr;
  EVP_CIPHER_CTX* dec_ = nullptr;
  EVP_CIPHER_CTX* essiv_ = nullptr;  // AES-256-ECB keyed by sha256(key)
};

}  // namespace uqcow::qcow2::crypto
