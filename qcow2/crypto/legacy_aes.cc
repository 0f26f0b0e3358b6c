#include "qcow2/crypto/legacy_aes.h"

#include <algorithm>
#include <cstring>

namespace uqcow::qcow2::crypto {

Result<std::unique_ptr<SectorCipher>> legacy_aes_cipher(std::string_view passphrase) {
  SecretBytes key(16);
  // QEMU takes strlen() of the secret, truncated to 16 bytes.
  const size_t len = std::min<size_t>(16, strnlen(passphrase.data(), passphrase.size()));
  std::memcpy(key.data(), passphrase.data(), len);
  CipherSpec spec{.alg = CipherAlg::kAes128, .mode = CipherMode::kCbc, .ivgen = IvGen::kPlain64};
  return SectorCipher::create(spec, key.span());
}

}  // namespace uqcow::qcow2::crypto
