// Unit tests of ImageEncryption alone: a LUKS header made by qemu-img
// unlocks with its passphrase and refuses a wrong one; legacy AES counts IV
// sectors from the guest offset, LUKS from the host offset; the data I/O
// round-trips through the file, stores ciphertext, and never modifies the
// caller's buffer; unaligned requests are refused.
#include "qcow2/encryption.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "engine/sync_wait.h"
#include "qcow2/header_io.h"
#include "tests/testutil.h"
#include "uring/raw_file.h"
#include "uring/reactor.h"

namespace uqcow::qcow2 {
namespace {

std::vector<std::byte> pattern(size_t n, uint8_t seed) {
  std::vector<std::byte> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = std::byte(static_cast<uint8_t>(seed + i * 31));
  return v;
}

class ImageEncryptionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto reactor = uring::Reactor::create();
    ASSERT_TRUE(reactor.ok());
    reactor_ = std::move(reactor).value();
  }
  void TearDown() override { file_.reset(); }
  template <class T>
  T run(Task<T> task) {
    return sync_wait(*reactor_, std::move(task));
  }
  // The FDE area of a LUKS image qemu-img made with passphrase "secret".
  std::vector<uint8_t> luks_area() {
    if (!testing::require_tool("qemu-img")) return {};
    EXPECT_TRUE(testing::Succeeded(testing::run_command(
        {"qemu-img", "create", "-f", "qcow2", "--object", "secret,id=s0,data=secret", "-o",
         "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", path_, "1M"})));
    open_file(true);
    auto h = run(read_image_header(*file_, HeaderUse::kOpen));
    EXPECT_TRUE(h.ok() && h->crypto_header) << (h.ok() ? "no crypto header" : h.error().message());
    if (!h.ok() || !h->crypto_header) return {};
    std::vector<uint8_t> area(h->crypto_header->length);
    EXPECT_TRUE(run(file_->co_read(h->crypto_header->offset,
                                   std::span<std::byte>(reinterpret_cast<std::byte*>(area.data()), area.size())))
                    .ok());
    return area;
  }
  void open_file(bool exists) {
    RawFileOptions o;
    o.create = !exists;
    auto f = RawFile::open(path_, o);
    ASSERT_TRUE(f.ok()) << f.error().message();
    file_ = std::move(f).value();
  }

  std::unique_ptr<uring::Reactor> reactor_;
  testing::TempDir dir_{"encryption_test"};
  const std::string path_ = dir_.file("luks.qcow2");
  std::unique_ptr<RawFile> file_;
};

TEST_F(ImageEncryptionTest, ALuksHeaderFromQemuImgUnlocksWithItsPassphraseOnly) {
  const std::vector<uint8_t> area = luks_area();
  if (IsSkipped() || HasFailure()) return;
  auto wrong = ImageEncryption::open_luks(area, "not the secret");
  ASSERT_FALSE(wrong.ok());
  EXPECT_EQ(wrong.error().code(), EPERM);
  auto right = ImageEncryption::open_luks(area, "secret");
  ASSERT_TRUE(right.ok()) << right.error().message();
  EXPECT_TRUE((*right)->physical_offsets()) << "LUKS: IVs from the host offset";
}

TEST_F(ImageEncryptionTest, LegacyAesCountsIvSectorsFromTheGuestOffset) {
  auto aes = ImageEncryption::open_legacy_aes("secret");
  ASSERT_TRUE(aes.ok()) << aes.error().message();
  EXPECT_FALSE((*aes)->physical_offsets());
  const auto plain = pattern(4096, 1);
  auto a = plain, b = plain, c = plain;
  ASSERT_TRUE((*aes)->encrypt(8192, 65536, a).ok());
  ASSERT_TRUE((*aes)->encrypt(8192, 131072, b).ok());
  ASSERT_TRUE((*aes)->encrypt(16384, 65536, c).ok());
  EXPECT_EQ(a, b) << "the host offset does not matter";
  EXPECT_NE(a, c) << "the guest offset does";
  ASSERT_TRUE((*aes)->decrypt(8192, 0, a).ok());
  EXPECT_EQ(a, plain);
}

TEST_F(ImageEncryptionTest, DataIoRoundTripsStoresCiphertextAndLeavesTheCallersBuffer) {
  const std::vector<uint8_t> area = luks_area();
  if (IsSkipped() || HasFailure()) return;
  auto luks = ImageEncryption::open_luks(area, "secret");
  ASSERT_TRUE(luks.ok()) << luks.error().message();
  ImageEncryption& e = **luks;
  const uint64_t host = 1 << 20;  // past the image's metadata
  const auto data = pattern(8192, 7);
  const auto copy = data;
  ASSERT_TRUE(run(e.write(*file_, 4096, host, data)).ok());
  EXPECT_EQ(data, copy) << "the caller's buffer is not encrypted in place";
  std::vector<std::byte> stored(data.size());
  ASSERT_TRUE(run(file_->co_read(host, stored)).ok());
  EXPECT_NE(stored, data) << "ciphertext on disk";
  std::vector<std::byte> back(data.size());
  ASSERT_TRUE(run(e.read(*file_, 4096, host, back)).ok());
  EXPECT_EQ(back, data);
  // LUKS keys the IVs on the host offset: the same bytes read back from
  // elsewhere do not decrypt to the data.
  ASSERT_TRUE(run(file_->co_write(host + data.size(), stored)).ok());
  ASSERT_TRUE(run(e.read(*file_, 4096, host + data.size(), back)).ok());
  EXPECT_NE(back, data);
}

TEST_F(ImageEncryptionTest, UnalignedRequestsAreRefused) {
  auto aes = ImageEncryption::open_legacy_aes("secret");
  ASSERT_TRUE(aes.ok());
  auto buf = pattern(1000, 3);
  Status s = (*aes)->encrypt(0, 0, buf);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), EINVAL);
  auto aligned = pattern(512, 3);
  s = (*aes)->decrypt(100, 0, aligned);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), EINVAL);
}

}  // namespace
}  // namespace uqcow::qcow2
