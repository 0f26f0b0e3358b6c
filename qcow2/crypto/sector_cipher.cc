#include "qcow2/crypto/sector_cipher.h"

#include <openssl/evp.h>

#include <cstring>

namespace uqcow::qcow2::crypto {
namespace {

const EVP_CIPHER* evp_cipher(const CipherSpec& s) {
  if (s.mode == CipherMode::kXts) return s.alg == CipherAlg::kAes128 ? EVP_aes_128_xts() : EVP_aes_256_xts();
  return s.alg == CipherAlg::kAes128 ? EVP_aes_128_cbc() : EVP_aes_256_cbc();
}

void store_le64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

// A context for `cipher` keyed with `key`, padding off (sectors are whole
// blocks). nullptr if OpenSSL refuses.
EVP_CIPHER_CTX* new_context(const EVP_CIPHER* cipher, const uint8_t* key, int enc) {
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  if (!ctx) return nullptr;
  if (EVP_CipherInit_ex(ctx, cipher, nullptr, key, nullptr, enc) != 1 ||
      EVP_CIPHER_CTX_set_padding(ctx, 0) != 1) {
    EVP_CIPHER_CTX_free(ctx);
    return nullptr;
  }
  return ctx;
}

}  // namespace

size_t CipherSpec::key_bytes() const {
  size_t one = alg == CipherAlg::kAes128 ? 16 : 32;
  return mode == CipherMode::kXts ? 2 * one : one;
}

std::string CipherSpec::alg_name() const { return alg == CipherAlg::kAes128 ? "aes-128" : "aes-256"; }
std::string CipherSpec::mode_name() const { return mode == CipherMode::kXts ? "xts" : "cbc"; }
std::string CipherSpec::ivgen_name() const {
  switch (ivgen) {
    case IvGen::kPlain: return "plain";
    case IvGen::kPlain64: return "plain64";
    case IvGen::kEssiv: return "essiv";
  }
  return "?";
}

Result<std::unique_ptr<SectorCipher>> SectorCipher::create(const CipherSpec& spec,
                                                           std::span<const uint8_t> key) {
  if (key.size() != spec.key_bytes()) {
    return Error(EINVAL, "cipher key: " + std::to_string(key.size()) + " bytes, " + spec.alg_name() + "-" +
                             spec.mode_name() + " takes " + std::to_string(spec.key_bytes()));
  }
  std::unique_ptr<SectorCipher> c(new SectorCipher(spec));
  const EVP_CIPHER* cipher = evp_cipher(spec);
  c->enc_ = new_context(cipher, key.data(), 1);
  c->dec_ = new_context(cipher, key.data(), 0);
  if (!c->enc_ || !c->dec_) return Error(EIO, "OpenSSL refused the " + spec.alg_name() + "-" + spec.mode_name() + " key");
  if (spec.ivgen == IvGen::kEssiv) {
    // QEMU's ivgen-essiv: salt = hash(key), IV = E_salt(plain64 block).
    SecretBytes salt(32);
    unsigned int len = 0;
    if (EVP_Digest(key.data(), key.size(), salt.data(), &len, EVP_sha256(), nullptr) != 1 || len != 32) {
      return Error(EIO, "essiv: sha256 of the key failed");
    }
    c->essiv_ = new_context(EVP_aes_256_ecb(), salt.data(), 1);
    if (!c->essiv_) return Error(EIO, "OpenSSL refused the essiv key");
  }
  return c;
}

SectorCipher::~SectorCipher() {
  // EVP_CIPHER_CTX_free cleanses the key schedule before freeing it.
  EVP_CIPHER_CTX_free(enc_);
  EVP_CIPHER_CTX_free(dec_);
  EVP_CIPHER_CTX_free(essiv_);
}

Status SectorCipher::make_iv(uint64_t sector, uint8_t iv[16]) {
  std::memset(iv, 0, 16);
  switch (spec_.ivgen) {
    case IvGen::kPlain:
      store_le64(iv, sector & 0xffffffffu);
      return Status();
    case IvGen::kPlain64:
      store_le64(iv, sector);
      return Status();
    case IvGen::kEssiv: {
      store_le64(iv, sector);
      int out = 0;
      if (EVP_EncryptUpdate(essiv_, iv, &out, iv, 16) != 1 || out != 16) return Error(EIO, "essiv: AES-ECB failed");
      return Status();
    }
  }
  return Error(EINVAL, "unknown IV generator");
}

Status SectorCipher::run(EVP_CIPHER_CTX* ctx, uint64_t sector, std::span<uint8_t> data) {
  if (data.size() % kSectorSize != 0) {
    return Error(EINVAL, "encrypted I/O of " + std::to_string(data.size()) + " bytes is not a multiple of 512");
  }
  for (size_t pos = 0; pos < data.size(); pos += kSectorSize, ++sector) {
    uint8_t iv[16];
    UQ_TRY(make_iv(sector, iv));
    int out = 0;
    // Key unchanged (nullptr): only the IV is reset for this sector.
    if (EVP_CipherInit_ex(ctx, nullptr, nullptr, nullptr, iv, -1) != 1 ||
        EVP_CipherUpdate(ctx, data.data() + pos, &out, data.data() + pos, kSectorSize) != 1 ||
        out != static_cast<int>(kSectorSize)) {
      return Error(EIO, spec_.alg_name() + "-" + spec_.mode_name() + " failed on sector " + std::to_string(sector));
    }
  }
  return Status();
}

Status SectorCipher::encrypt(uint64_t first_sector, std::span<uint8_t> data) {
  return run(enc_, first_sector, data);
}

Status SectorCipher::decrypt(uint64_t first_sector, std::span<uint8_t> data) {
  return run(dec_, first_sector, data);
}

}  // namespace uqcow::qcow2::crypto
