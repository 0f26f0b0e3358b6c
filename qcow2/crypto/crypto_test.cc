// The sector cipher against OpenSSL used directly (an independent oracle for
// the IV generators), AF split/merge, and LUKS headers: create/unlock round
// trip, wrong passphrase, and malformed fields named in the error.
#include <gtest/gtest.h>
#include <openssl/evp.h>

#include <cstring>
#include <vector>

#include "block/endian.h"
#include "qcow2/crypto/afsplit.h"
#include "qcow2/crypto/legacy_aes.h"
#include "qcow2/crypto/luks.h"
#include "qcow2/crypto/sector_cipher.h"

namespace uqcow::qcow2::crypto {
namespace {

std::vector<uint8_t> pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 7 + (i >> 9));
  return v;
}

// One sector through EVP with an explicit IV.
std::vector<uint8_t> evp_sector(const EVP_CIPHER* c, const uint8_t* key, const uint8_t* iv, const uint8_t* in) {
  std::vector<uint8_t> out(512);
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  int n = 0;
  EXPECT_EQ(EVP_EncryptInit_ex(ctx, c, nullptr, key, iv), 1);
  EVP_CIPHER_CTX_set_padding(ctx, 0);
  EXPECT_EQ(EVP_EncryptUpdate(ctx, out.data(), &n, in, 512), 1);
  EVP_CIPHER_CTX_free(ctx);
  return out;
}

void le64(uint8_t* iv, uint64_t v) {
  std::memset(iv, 0, 16);
  for (int i = 0; i < 8; ++i) iv[i] = static_cast<uint8_t>(v >> (8 * i));
}

TEST(SectorCipher, XtsPlain64MatchesOpenSsl) {
  const auto key = pattern(64, 1);
  const auto plain = pattern(3 * 512, 9);
  auto c = SectorCipher::create({CipherAlg::kAes256, CipherMode::kXts, IvGen::kPlain64}, key);
  ASSERT_TRUE(c.ok()) << c.error().message();
  auto data = plain;
  ASSERT_TRUE((*c)->encrypt(0x1'0000'0005ull, data).ok());
  for (int s = 0; s < 3; ++s) {
    uint8_t iv[16];
    le64(iv, 0x1'0000'0005ull + s);
    auto want = evp_sector(EVP_aes_256_xts(), key.data(), iv, plain.data() + s * 512);
    EXPECT_EQ(0, std::memcmp(want.data(), data.data() + s * 512, 512)) << "sector " << s;
  }
  ASSERT_TRUE((*c)->decrypt(0x1'0000'0005ull, data).ok());
  EXPECT_EQ(data, plain);
}

TEST(SectorCipher, PlainIvTruncatesTo32Bits) {
  const auto key = pattern(16, 3);
  const auto plain = pattern(512, 4);
  auto c = SectorCipher::create({CipherAlg::kAes128, CipherMode::kCbc, IvGen::kPlain}, key);
  ASSERT_TRUE(c.ok());
  auto data = plain;
  ASSERT_TRUE((*c)->encrypt(0x7'0000'0002ull, data).ok());
  uint8_t iv[16];
  le64(iv, 2);
  EXPECT_EQ(evp_sector(EVP_aes_128_cbc(), key.data(), iv, plain.data()), data);
}

TEST(SectorCipher, CbcEssivMatchesOpenSsl) {
  const auto key = pattern(16, 5);
  const auto plain = pattern(2 * 512, 6);
  auto c = SectorCipher::create({CipherAlg::kAes128, CipherMode::kCbc, IvGen::kEssiv}, key);
  ASSERT_TRUE(c.ok());
  auto data = plain;
  ASSERT_TRUE((*c)->encrypt(40, data).ok());
  uint8_t salt[32];
  unsigned len = 0;
  EVP_Digest(key.data(), key.size(), salt, &len, EVP_sha256(), nullptr);
  for (int s = 0; s < 2; ++s) {
    uint8_t block[16], iv[16];
    le64(block, 40 + s);
    EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
    int n = 0;
    EVP_EncryptInit_ex(ctx, EVP_aes_256_ecb(), nullptr, salt, nullptr);
    EVP_CIPHER_CTX_set_padding(ctx, 0);
    EVP_EncryptUpdate(ctx, iv, &n, block, 16);
    EVP_CIPHER_CTX_free(ctx);
    EXPECT_EQ(evp_sector(EVP_aes_128_cbc(), key.data(), iv, plain.data() + s * 512),
              std::vector<uint8_t>(data.begin() + s * 512, data.begin() + (s + 1) * 512));
  }
}

TEST(SectorCipher, RefusesPartialSectorsAndWrongKeys) {
  auto bad = SectorCipher::create({CipherAlg::kAes256, CipherMode::kXts, IvGen::kPlain64}, pattern(32, 1));
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().message().find("cipher key"), std::string::npos);
  auto c = SectorCipher::create({CipherAlg::kAes256, CipherMode::kCbc, IvGen::kPlain64}, pattern(32, 1));
  ASSERT_TRUE(c.ok());
  std::vector<uint8_t> odd(700);
  EXPECT_EQ((*c)->encrypt(0, odd).code(), EINVAL);
}

TEST(LegacyAes, KeyIsThePassphrasePaddedTo16Bytes) {
  const auto plain = pattern(512, 8);
  auto c = legacy_aes_cipher("abc123");
  ASSERT_TRUE(c.ok());
  auto data = plain;
  ASSERT_TRUE((*c)->encrypt(128, data).ok());
  uint8_t key[16] = {'a', 'b', 'c', '1', '2', '3'}, iv[16];
  le64(iv, 128);
  EXPECT_EQ(evp_sector(EVP_aes_128_cbc(), key, iv, plain.data()), data);
}

TEST(AfSplit, MergeUndoesSplit) {
  const auto key = pattern(64, 2);
  std::vector<uint8_t> split(64 * 4000), back(64);
  ASSERT_TRUE(af_split(EVP_sha256(), 4000, key, split).ok());
  ASSERT_TRUE(af_merge(EVP_sha256(), 4000, split, back).ok());
  EXPECT_EQ(back, key);
  split[12345] ^= 1;  // any damage destroys the key
  ASSERT_TRUE(af_merge(EVP_sha256(), 4000, split, back).ok());
  EXPECT_NE(back, key);
}

LuksCreated make_luks(CipherSpec spec = {}) {
  LuksCreateOptions o;
  o.spec = spec;
  o.iter_time_ms = 1;
  auto c = luks_create(o, "s3cret");
  EXPECT_TRUE(c.ok()) << c.error().message();
  return std::move(c).value();
}

TEST(Luks, CreateThenUnlock) {
  for (CipherSpec spec : {CipherSpec{}, CipherSpec{CipherAlg::kAes128, CipherMode::kCbc, IvGen::kEssiv}}) {
    LuksCreated c = make_luks(spec);
    EXPECT_EQ(c.area.size(), spec.key_bytes() == 64 ? 2068480u : c.area.size());  // QEMU's layout
    auto h = parse_luks_header(c.area);
    ASSERT_TRUE(h.ok()) << h.error().message();
    EXPECT_EQ(h->spec.key_bytes(), spec.key_bytes());
    auto key = luks_unlock(*h, c.area, "s3cret");
    ASSERT_TRUE(key.ok()) << key.error().message();
    EXPECT_EQ(std::vector<uint8_t>(key->data(), key->data() + key->size()),
              std::vector<uint8_t>(c.master_key.data(), c.master_key.data() + c.master_key.size()));
    auto wrong = luks_unlock(*h, c.area, "s3cret!");
    ASSERT_FALSE(wrong.ok());
    EXPECT_EQ(wrong.error().code(), EPERM);
    EXPECT_NE(wrong.error().message().find("invalid passphrase"), std::string::npos);
  }
}

struct Patch {
  const char* name;
  size_t offset;
  uint32_t value;
  int width;  // 2 or 4 bytes (big-endian), 1 for a byte
  const char* field;
};

TEST(Luks, MalformedFieldsAreNamed) {
  const LuksCreated c = make_luks();
  constexpr size_t kSlot0 = 208, kSlot1 = 256;
  const Patch patches[] = {
      {"magic", 0, 'X', 1, "magic"},
      {"version", 6, 2, 2, "version"},
      {"cipher", 8, 'b', 1, "cipher_name"},
      {"mode", 40, 'e', 1, "cipher_mode"},
      {"hash", 72, 'm', 1, "hash_spec"},
      {"key_bytes", 108, 0x7fffffff, 4, "key_bytes"},
      {"mk_iters_zero", 164, 0, 4, "mk_digest_iterations"},
      {"mk_iters_huge", 164, 0xffffffff, 4, "mk_digest_iterations"},
      {"slot_active", kSlot0, 0x12345678, 4, "key slot 0 active"},
      {"slot_iters", kSlot0 + 4, 0xffffffff, 4, "key slot 0 iterations"},
      {"slot_stripes", kSlot0 + 44, 0xffffffff, 4, "key slot 0 stripes"},
      {"slot_offset_huge", kSlot0 + 40, 0xfffffff0, 4, "key slot 0 key_offset"},
      {"slot_offset_header", kSlot0 + 40, 0, 4, "key slot 0 key_offset"},
      {"slot1_activated_past_end", kSlot1 + 40, 0x00800000, 4, "key slot 1"},
  };
  for (const Patch& p : patches) {
    std::vector<uint8_t> area = c.area;
    if (p.width == 1) area[p.offset] = static_cast<uint8_t>(p.value);
    if (p.width == 2) store_be16(&area[p.offset], static_cast<uint16_t>(p.value));
    if (p.width == 4) store_be32(&area[p.offset], p.value);
    if (std::string(p.name) == "slot1_activated_past_end") {
      store_be32(&area[kSlot1], kLuksSlotActive);
      store_be32(&area[kSlot1 + 4], 1000);
    }
    auto h = parse_luks_header(area);
    ASSERT_FALSE(h.ok()) << p.name;
    EXPECT_NE(h.error().message().find(p.field), std::string::npos) << p.name << ": " << h.error().message();
  }
  auto small = parse_luks_header(std::span<const uint8_t>(c.area.data(), 100));
  ASSERT_FALSE(small.ok());
  // The key material must lie inside the area handed over (the FDE length).
  auto cut = parse_luks_header(std::span<const uint8_t>(c.area.data(), 8192));
  ASSERT_FALSE(cut.ok());
  EXPECT_NE(cut.error().message().find("key slot 0 key_offset"), std::string::npos) << cut.error().message();
}

}  // namespace
}  // namespace uqcow::qcow2::crypto
