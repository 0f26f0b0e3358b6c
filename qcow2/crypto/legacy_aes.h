// qcow2's legacy encryption (crypt_method 1, QEMU's crypto/block-qcow.c):
// AES-128-CBC with plain64 IVs, keyed by the passphrase's first 16 bytes
// (up to its first NUL) padded with zeros. There is no key check: a wrong
// passphrase decrypts to garbage, which is why QEMU deprecated the format.
#pragma once

#include <memory>
#include <string_view>

#include "engine/result.h"
#include "qcow2/crypto/sector_cipher.h"

namespace uqcow::qcow2::crypto {

Result<std::unique_ptr<SectorCipher>> legacy_aes_cipher(std::string_view passphrase);

}  // namespace uqcow::qcow2::crypto
