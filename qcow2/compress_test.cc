// Unit tests of the compressed-cluster codec: both types round-trip; the
// zlib stream is what QEMU writes and reads (raw deflate, 4 KiB window:
// inflated here with zlib's own inflate, not ours); zstd frames decode with
// libzstd's one-shot API; incompressible data is reported as such; slack
// after a stream (sector padding) is ignored; a truncated or garbage stream
// is an EIO naming the type, never a crash.
#include "qcow2/compress.h"

#include <gtest/gtest.h>
#include <zlib.h>
#include <zstd.h>

#include <cstdint>
#include <string>
#include <vector>

namespace uqcow::qcow2 {
namespace {

constexpr size_t kCluster = 65536;

std::vector<uint8_t> compressible() {
  std::vector<uint8_t> v(kCluster);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<uint8_t>((i / 512) * 7 + (i % 13));
  return v;
}

std::vector<uint8_t> random_bytes() {
  std::vector<uint8_t> v(kCluster);
  uint64_t x = 0x9e3779b97f4a7c15ull;
  for (auto& b : v) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    b = static_cast<uint8_t>(x);
  }
  return v;
}

std::vector<uint8_t> compress(CompressionType type, const std::vector<uint8_t>& in) {
  std::vector<uint8_t> out(kCluster);
  auto n = compress_cluster(type, in, out);
  EXPECT_TRUE(n.ok()) << n.error().message();
  out.resize(n.ok() ? *n : 0);
  return out;
}

class CompressTest : public ::testing::TestWithParam<CompressionType> {};

TEST_P(CompressTest, RoundTrips) {
  const auto data = compressible();
  const auto packed = compress(GetParam(), data);
  ASSERT_GT(packed.size(), 0u);
  EXPECT_LT(packed.size(), data.size() / 4);
  std::vector<uint8_t> back(kCluster);
  ASSERT_TRUE(decompress_cluster(GetParam(), packed, back).ok());
  EXPECT_EQ(back, data);
}

TEST_P(CompressTest, IncompressibleDataIsReportedAsSuch) {
  EXPECT_EQ(compress(GetParam(), random_bytes()).size(), 0u) << "0: write the cluster uncompressed";
}

TEST_P(CompressTest, SlackAfterTheStreamIsIgnored) {
  const auto data = compressible();
  auto packed = compress(GetParam(), data);
  packed.insert(packed.end(), 511, 0xa5);  // up to the end of the last sector
  std::vector<uint8_t> back(kCluster);
  ASSERT_TRUE(decompress_cluster(GetParam(), packed, back).ok());
  EXPECT_EQ(back, data);
}

TEST_P(CompressTest, ATruncatedOrGarbageStreamIsAnErrorNamingTheType) {
  const char* name = GetParam() == CompressionType::kZlib ? "zlib" : "zstd";
  const auto packed = compress(GetParam(), compressible());
  std::vector<uint8_t> back(kCluster);
  const std::vector<uint8_t> half(packed.begin(), packed.begin() + packed.size() / 2);
  Status s = decompress_cluster(GetParam(), half, back);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), EIO);
  EXPECT_NE(s.message().find(name), std::string::npos) << s.message();
  const std::vector<uint8_t> garbage(4096, 0xff);
  s = decompress_cluster(GetParam(), garbage, back);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), EIO);
}

INSTANTIATE_TEST_SUITE_P(Types, CompressTest, ::testing::Values(CompressionType::kZlib, CompressionType::kZstd),
                         [](const auto& info) { return info.param == CompressionType::kZlib ? "zlib" : "zstd"; });

TEST(CompressFormat, ZlibIsRawDeflateWithAFourKiBWindowAsQemuReadsIt) {
  const auto data = compressible();
  auto packed = compress(CompressionType::kZlib, data);
  z_stream z{};
  ASSERT_EQ(inflateInit2(&z, -12), Z_OK);
  std::vector<uint8_t> back(kCluster);
  z.next_in = packed.data();
  z.avail_in = static_cast<uInt>(packed.size());
  z.next_out = back.data();
  z.avail_out = static_cast<uInt>(back.size());
  const int rc = inflate(&z, Z_FINISH);
  inflateEnd(&z);
  EXPECT_EQ(rc, Z_STREAM_END);
  EXPECT_EQ(back, data);
}

TEST(CompressFormat, ZstdIsOneFrame) {
  const auto data = compressible();
  auto packed = compress(CompressionType::kZstd, data);
  std::vector<uint8_t> back(kCluster);
  const size_t n = ZSTD_decompress(back.data(), back.size(), packed.data(), packed.size());
  ASSERT_FALSE(ZSTD_isError(n)) << ZSTD_getErrorName(n);
  EXPECT_EQ(n, kCluster);
  EXPECT_EQ(back, data);
}

}  // namespace
}  // namespace uqcow::qcow2
