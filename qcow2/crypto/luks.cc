#include "qcow2/crypto/luks.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>

#include "block/endian.h"
#include "qcow2/crypto/afsplit.h"

namespace uqcow::qcow2::crypto {
namespace {

constexpr uint8_t kMagic[6] = {'L', 'U', 'K', 'S', 0xBA, 0xBE};
constexpr size_t kSlotsOffset = 208, kSlotBytes = 48;
constexpr uint32_t kHeaderSectors = (kLuksHeaderBytes + kSectorSize - 1) / kSectorSize;
constexpr uint32_t kKeySlotOffsetSectors = 4096 / kSectorSize;  // QEMU's first slot
constexpr uint32_t kKeySlotAlignSectors = 4096 / kSectorSize;

Error invalid(const std::string& field, const std::string& why) {
  return Error(EINVAL, "LUKS header field " + field + ": " + why);
}

std::string fixed_string(const uint8_t* p, size_t size) {
  return std::string(reinterpret_cast<const char*>(p), strnlen(reinterpret_cast<const char*>(p), size));
}

void put_string(uint8_t* p, size_t size, const std::string& s) {
  std::memcpy(p, s.data(), std::min(size - 1, s.size()));
}

// The PBKDF2 / AF hashes QEMU offers for LUKS.
const EVP_MD* hash_by_name(const std::string& name) {
  if (name == "sha1") return EVP_sha1();
  if (name == "sha256") return EVP_sha256();
  if (name == "sha512") return EVP_sha512();
  return nullptr;
}

// "xts-plain64", "cbc-essiv:sha256" with key_bytes -> CipherSpec.
Result<CipherSpec> decode_cipher(const std::string& name, const std::string& mode_spec, uint32_t key_bytes) {
  if (name != "aes") return Error(ENOTSUP, "LUKS header field cipher_name: '" + name + "' is not supported (aes is)");
  CipherSpec s;
  const auto dash = mode_spec.find('-');
  const std::string mode = mode_spec.substr(0, dash);
  const std::string ivgen = dash == std::string::npos ? "" : mode_spec.substr(dash + 1);
  if (mode == "xts") s.mode = CipherMode::kXts;
  else if (mode == "cbc") s.mode = CipherMode::kCbc;
  else return Error(ENOTSUP, "LUKS header field cipher_mode: '" + mode_spec + "' is not supported (xts, cbc)");
  if (ivgen == "plain64") s.ivgen = IvGen::kPlain64;
  else if (ivgen == "plain") s.ivgen = IvGen::kPlain;
  else if (ivgen == "essiv:sha256") s.ivgen = IvGen::kEssiv;
  else return Error(ENOTSUP, "LUKS header field cipher_mode: IV generator of '" + mode_spec +
                                 "' is not supported (plain, plain64, essiv:sha256)");
  const uint32_t one = s.mode == CipherMode::kXts ? key_bytes / 2 : key_bytes;
  if (one == 16) s.alg = CipherAlg::kAes128;
  else if (one == 32 && (key_bytes == 32 || key_bytes == 64)) s.alg = CipherAlg::kAes256;
  else return invalid("key_bytes", std::to_string(key_bytes) + " does not fit aes-" + mode);
  if (s.key_bytes() != key_bytes) return invalid("key_bytes", std::to_string(key_bytes) + " does not fit aes-" + mode);
  return s;
}

uint64_t material_bytes(uint32_t key_bytes, uint32_t stripes) {
  return (uint64_t{key_bytes} * stripes + kSectorSize - 1) / kSectorSize * kSectorSize;
}

Status check_slot(const LuksHeader& h, size_t i, uint64_t area_size) {
  const LuksKeySlot& s = h.slots[i];
  const std::string name = "key slot " + std::to_string(i) + " ";
  if (s.active != kLuksSlotActive && s.active != kLuksSlotInactive) {
    return invalid(name + "active", "0x" + std::to_string(s.active) + " is neither active nor inactive");
  }
  if (s.active != kLuksSlotActive) return Status();
  if (s.iterations == 0 || s.iterations > kLuksMaxIterations) {
    return invalid(name + "iterations", std::to_string(s.iterations) + " is outside 1.." +
                                            std::to_string(kLuksMaxIterations));
  }
  if (s.stripes != kLuksStripes) {
    return invalid(name + "stripes", std::to_string(s.stripes) + " is not " + std::to_string(kLuksStripes));
  }
  const uint64_t start = uint64_t{s.key_offset} * kSectorSize;
  const uint64_t end = start + material_bytes(h.key_bytes, s.stripes);
  if (s.key_offset < kHeaderSectors) return invalid(name + "key_offset", "overlaps the LUKS header");
  if (end > area_size) {
    return invalid(name + "key_offset", "key material [" + std::to_string(start) + ", " + std::to_string(end) +
                                            ") runs past the crypto header area of " + std::to_string(area_size) +
                                            " bytes");
  }
  if (end > uint64_t{h.payload_offset} * kSectorSize) {
    return invalid(name + "key_offset", "key material overlaps the payload (payload_offset " +
                                            std::to_string(h.payload_offset) + ")");
  }
  return Status();
}

Status pbkdf2(const EVP_MD* md, std::span<const uint8_t> secret, std::span<const uint8_t> salt,
              uint32_t iterations, std::span<uint8_t> out) {
  if (PKCS5_PBKDF2_HMAC(reinterpret_cast<const char*>(secret.data()), static_cast<int>(secret.size()), salt.data(),
                        static_cast<int>(salt.size()), static_cast<int>(iterations), md,
                        static_cast<int>(out.size()), out.data()) != 1) {
    return Error(EIO, "PBKDF2 failed");
  }
  return Status();
}

std::span<const uint8_t> bytes_of(std::string_view s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

// Opens one slot: the candidate master key, not yet checked.
Status open_slot(const LuksHeader& h, const LuksKeySlot& slot, const EVP_MD* md, std::span<const uint8_t> area,
                 std::string_view passphrase, SecretBytes& master_key) {
  SecretBytes slot_key(h.key_bytes);
  UQ_TRY(pbkdf2(md, bytes_of(passphrase), slot.salt, slot.iterations, slot_key.span()));
  const uint64_t start = uint64_t{slot.key_offset} * kSectorSize;
  SecretBytes material(area.subspan(start, material_bytes(h.key_bytes, slot.stripes)));
  UQ_ASSIGN_OR_RETURN(auto cipher, SectorCipher::create(h.spec, slot_key.span()));
  UQ_TRY(cipher->decrypt(0, material.span()));
  return af_merge(md, slot.stripes, material.span().first(uint64_t{h.key_bytes} * slot.stripes), master_key.span());
}

// PBKDF2 iterations per second of this machine (qcrypto_pbkdf2_count_iters).
Result<uint64_t> pbkdf2_iterations_per_second(const EVP_MD* md, size_t key_bytes) {
  uint8_t salt[32] = {}, out[64];
  const uint8_t secret[8] = {};
  for (uint32_t iters = 1 << 10;; iters *= 2) {
    const auto t0 = std::chrono::steady_clock::now();
    UQ_TRY(pbkdf2(md, secret, salt, iters, std::span<uint8_t>(out, key_bytes)));
    const auto us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0).count();
    if (us >= 50000 || iters >= kLuksMaxIterations) return uint64_t{iters} * 1000000 / std::max<uint64_t>(us, 1);
  }
}

uint32_t clamp_iterations(uint64_t n) {
  return static_cast<uint32_t>(std::clamp<uint64_t>(n, kLuksMinIterations, kLuksMaxIterations));
}

std::string random_uuid() {
  uint8_t u[16];
  RAND_bytes(u, sizeof u);
  u[6] = (u[6] & 0x0f) | 0x40;
  u[8] = (u[8] & 0x3f) | 0x80;
  char s[37];
  std::snprintf(s, sizeof s, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0], u[1],
                u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
  return s;
}

}  // namespace

Result<LuksHeader> parse_luks_header(std::span<const uint8_t> area) {
  if (area.size() < kLuksHeaderBytes) {
    return invalid("magic", "the crypto header area (" + std::to_string(area.size()) + " bytes) is smaller than a LUKS header");
  }
  const uint8_t* b = area.data();
  if (std::memcmp(b, kMagic, sizeof kMagic) != 0) return invalid("magic", "not a LUKS header");
  if (uint32_t v = load_be16(b + 6); v != 1) return invalid("version", std::to_string(v) + " is not 1");
  LuksHeader h;
  h.cipher_name = fixed_string(b + 8, 32);
  h.cipher_mode = fixed_string(b + 40, 32);
  h.hash_spec = fixed_string(b + 72, 32);
  h.payload_offset = load_be32(b + 104);
  h.key_bytes = load_be32(b + 108);
  std::memcpy(h.mk_digest.data(), b + 112, 20);
  std::memcpy(h.mk_digest_salt.data(), b + 132, 32);
  h.mk_digest_iterations = load_be32(b + 164);
  h.uuid = fixed_string(b + 168, 40);
  if (!hash_by_name(h.hash_spec)) {
    return Error(ENOTSUP, "LUKS header field hash_spec: '" + h.hash_spec + "' is not supported (sha1, sha256, sha512)");
  }
  UQ_ASSIGN_OR_RETURN(h.spec, decode_cipher(h.cipher_name, h.cipher_mode, h.key_bytes));
  if (h.mk_digest_iterations == 0 || h.mk_digest_iterations > kLuksMaxIterations) {
    return invalid("mk_digest_iterations", std::to_string(h.mk_digest_iterations) + " is outside 1.." +
                                               std::to_string(kLuksMaxIterations));
  }
  bool any_active = false;
  for (size_t i = 0; i < kLuksSlots; ++i) {
    const uint8_t* s = b + kSlotsOffset + i * kSlotBytes;
    LuksKeySlot& slot = h.slots[i];
    slot.active = load_be32(s);
    slot.iterations = load_be32(s + 4);
    std::memcpy(slot.salt.data(), s + 8, 32);
    slot.key_offset = load_be32(s + 40);
    slot.stripes = load_be32(s + 44);
    UQ_TRY(check_slot(h, i, area.size()));
    any_active |= slot.active == kLuksSlotActive;
  }
  if (!any_active) return invalid("key slots", "no key slot is active");
  return h;
}

std::vector<uint8_t> serialize_luks_header(const LuksHeader& h) {
  std::vector<uint8_t> out(kLuksHeaderBytes, 0);
  uint8_t* b = out.data();
  std::memcpy(b, kMagic, sizeof kMagic);
  store_be16(b + 6, 1);
  put_string(b + 8, 32, h.cipher_name);
  put_string(b + 40, 32, h.cipher_mode);
  put_string(b + 72, 32, h.hash_spec);
  store_be32(b + 104, h.payload_offset);
  store_be32(b + 108, h.key_bytes);
  std::memcpy(b + 112, h.mk_digest.data(), 20);
  std::memcpy(b + 132, h.mk_digest_salt.data(), 32);
  store_be32(b + 164, h.mk_digest_iterations);
  put_string(b + 168, 40, h.uuid);
  for (size_t i = 0; i < kLuksSlots; ++i) {
    uint8_t* s = b + kSlotsOffset + i * kSlotBytes;
    const LuksKeySlot& slot = h.slots[i];
    store_be32(s, slot.active);
    store_be32(s + 4, slot.iterations);
    std::memcpy(s + 8, slot.salt.data(), 32);
    store_be32(s + 40, slot.key_offset);
    store_be32(s + 44, slot.stripes);
  }
  return out;
}

Result<SecretBytes> luks_unlock(const LuksHeader& h, std::span<const uint8_t> area, std::string_view passphrase) {
  const EVP_MD* md = hash_by_name(h.hash_spec);
  if (!md) return Error(ENOTSUP, "LUKS header field hash_spec: '" + h.hash_spec + "' is not supported");
  SecretBytes master_key(h.key_bytes);
  uint8_t digest[20];
  for (const LuksKeySlot& slot : h.slots) {
    if (slot.active != kLuksSlotActive) continue;
    UQ_TRY(open_slot(h, slot, md, area, passphrase, master_key));
    UQ_TRY(pbkdf2(md, master_key.span(), h.mk_digest_salt, h.mk_digest_iterations, digest));
    if (CRYPTO_memcmp(digest, h.mk_digest.data(), sizeof digest) == 0) return master_key;
  }
  return Error(EPERM, "invalid passphrase: no LUKS key slot opens with it");
}

Result<LuksCreated> luks_create(const LuksCreateOptions& o, std::string_view passphrase) {
  const EVP_MD* md = hash_by_name(o.hash);
  if (!md) return Error(EINVAL, "encrypt.hash-alg: '" + o.hash + "' is not supported (sha1, sha256, sha512)");
  LuksHeader h;
  h.spec = o.spec;
  h.cipher_name = "aes";
  h.cipher_mode = o.spec.mode_name() + "-" + o.spec.ivgen_name() + (o.spec.ivgen == IvGen::kEssiv ? ":sha256" : "");
  h.hash_spec = o.hash;
  h.key_bytes = static_cast<uint32_t>(o.spec.key_bytes());
  h.uuid = random_uuid();
  const uint32_t split_sectors =
      static_cast<uint32_t>((material_bytes(h.key_bytes, kLuksStripes) / kSectorSize + kKeySlotAlignSectors - 1) /
                            kKeySlotAlignSectors * kKeySlotAlignSectors);
  for (size_t i = 0; i < kLuksSlots; ++i) h.slots[i].key_offset = kKeySlotOffsetSectors + static_cast<uint32_t>(i) * split_sectors;
  h.payload_offset = kKeySlotOffsetSectors + static_cast<uint32_t>(kLuksSlots) * split_sectors;

  UQ_ASSIGN_OR_RETURN(uint64_t ips, pbkdf2_iterations_per_second(md, h.key_bytes));
  const uint64_t slot_iters = ips * o.iter_time_ms / 1000;
  // QEMU (after cryptsetup) spends an eighth of the time on the digest.
  h.mk_digest_iterations = clamp_iterations(slot_iters / 8);
  LuksKeySlot& slot = h.slots[0];
  slot.active = kLuksSlotActive;
  slot.iterations = clamp_iterations(slot_iters);

  LuksCreated out;
  out.master_key = SecretBytes(h.key_bytes);
  if (RAND_bytes(out.master_key.data(), static_cast<int>(h.key_bytes)) != 1 ||
      RAND_bytes(h.mk_digest_salt.data(), 32) != 1 || RAND_bytes(slot.salt.data(), 32) != 1) {
    return Error(EIO, "RAND_bytes failed");
  }
  UQ_TRY(pbkdf2(md, out.master_key.span(), h.mk_digest_salt, h.mk_digest_iterations, h.mk_digest));

  SecretBytes slot_key(h.key_bytes);
  UQ_TRY(pbkdf2(md, bytes_of(passphrase), slot.salt, slot.iterations, slot_key.span()));
  SecretBytes material(material_bytes(h.key_bytes, kLuksStripes));
  UQ_TRY(af_split(md, kLuksStripes, out.master_key.span(),
                  material.span().first(uint64_t{h.key_bytes} * kLuksStripes)));
  UQ_ASSIGN_OR_RETURN(auto cipher, SectorCipher::create(h.spec, slot_key.span()));
  UQ_TRY(cipher->encrypt(0, material.span()));

  out.area.assign(uint64_t{h.payload_offset} * kSectorSize, 0);
  const auto header = serialize_luks_header(h);
  std::copy(header.begin(), header.end(), out.area.begin());
  std::copy(material.data(), material.data() + material.size(), out.area.begin() + uint64_t{slot.key_offset} * kSectorSize);
  return out;
}

}  // namespace uqcow::qcow2::crypto
