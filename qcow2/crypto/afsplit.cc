#include "qcow2/crypto/afsplit.h"

#include <openssl/evp.h>
#include <openssl/rand.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "qcow2/crypto/secret.h"

namespace uqcow::qcow2::crypto {
namespace {

// The diffusion step: each digest-sized chunk i of `block` is replaced by
// hash(be32(i) || chunk), the last chunk possibly shorter.
Status diffuse(const EVP_MD* hash, std::span<uint8_t> block) {
  const size_t digest = static_cast<size_t>(EVP_MD_get_size(hash));
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  if (!ctx) return Error(ENOMEM, "afsplit: no digest context");
  Status s;
  uint8_t out[EVP_MAX_MD_SIZE];
  for (size_t pos = 0, i = 0; pos < block.size(); pos += digest, ++i) {
    const size_t len = std::min(digest, block.size() - pos);
    const uint8_t iv[4] = {static_cast<uint8_t>(i >> 24), static_cast<uint8_t>(i >> 16),
                           static_cast<uint8_t>(i >> 8), static_cast<uint8_t>(i)};
    if (EVP_DigestInit_ex(ctx, hash, nullptr) != 1 || EVP_DigestUpdate(ctx, iv, 4) != 1 ||
        EVP_DigestUpdate(ctx, block.data() + pos, len) != 1 || EVP_DigestFinal_ex(ctx, out, nullptr) != 1) {
      s = Error(EIO, "afsplit: digest failed");
      break;
    }
    std::memcpy(block.data() + pos, out, len);
  }
  OPENSSL_cleanse(out, sizeof out);
  EVP_MD_CTX_free(ctx);
  return s;
}

void xor_into(uint8_t* dst, const uint8_t* src, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] ^= src[i];
}

}  // namespace

Status af_split(const EVP_MD* hash, uint32_t stripes, std::span<const uint8_t> key, std::span<uint8_t> out) {
  const size_t n = key.size();
  if (stripes == 0 || out.size() != n * stripes) return Error(EINVAL, "afsplit: size mismatch");
  SecretBytes block(n);
  if (RAND_bytes(out.data(), static_cast<int>(n * (stripes - 1))) != 1) return Error(EIO, "afsplit: RAND_bytes failed");
  for (uint32_t i = 0; i + 1 < stripes; ++i) {
    xor_into(block.data(), out.data() + i * n, n);
    UQ_TRY(diffuse(hash, block.span()));
  }
  uint8_t* last = out.data() + (stripes - 1) * n;
  for (size_t i = 0; i < n; ++i) last[i] = block.data()[i] ^ key[i];
  return Status();
}

Status af_merge(const EVP_MD* hash, uint32_t stripes, std::span<const uint8_t> in, std::span<uint8_t> key) {
  const size_t n = key.size();
  if (stripes == 0 || in.size() != n * stripes) return Error(EINVAL, "afsplit: size mismatch");
  SecretBytes block(n);
  for (uint32_t i = 0; i + 1 < stripes; ++i) {
    xor_into(block.data(), in.data() + i * n, n);
    UQ_TRY(diffuse(hash, block.span()));
  }
  const uint8_t* last = in.data() + (stripes - 1) * n;
  for (size_t i = 0; i < n; ++i) key[i] = block.data()[i] ^ last[i];
  return Status();
}

}  // namespace uqcow::qcow2::crypto
