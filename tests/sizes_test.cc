// Sizes as qemu-img 7.2 handles them (issue 13): `create` rounds a size up
// to a multiple of 512, `resize` refuses what qemu-img refuses with the same
// message and exit code, and bytes past an old, smaller size read as zero
// after a shrink and a grow (checked by qemu-io, the independent reader).
#include <gtest/gtest.h>

#include <ostream>
#include <regex>
#include <string>
#include <vector>

#include "tests/testutil.h"

namespace uqcow::testing {
namespace {

// What a tool printed on stderr, without its "qemu-img: " / "uqcow: " line
// prefixes, so that the two tools' messages compare as text.
std::string message(const std::string& err) {
  static const std::regex prefix("(^|\n)(qemu-img|uqcow): ");
  return std::regex_replace(err, prefix, "$1");
}

// The virtual size qemu-img reports (the independent reading of the header).
uint64_t virtual_size(const std::string& path) {
  auto r = run_command({"qemu-img", "info", "--output=json", path});
  EXPECT_TRUE(Succeeded(r));
  std::smatch m;
  if (!std::regex_search(r.out, m, std::regex("\"virtual-size\": ([0-9]+)"))) return UINT64_MAX;
  return std::stoull(m[1]);
}

class SizesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!require_tool("qemu-img") || !require_tool("qemu-io")) return;
    ASSERT_FALSE(uqcow_binary().empty()) << "UQCOW is not set";
  }
  TempDir dir_{"sizes"};
};

const std::vector<std::string> kCreateSizes = {
    "1000000", "1000001", "1000447", "1000448", "511", "1", "0", "1.5k", "64M",
    "abc", "-5", "8E", "9E", "18446744073709551615", "18446744073709551616"};

TEST_F(SizesTest, CreateRoundsUpAndRefusesLikeQemuImg) {
  for (const std::string format : {"qcow2", "raw"}) {
    for (const auto& size : kCreateSizes) {
      SCOPED_TRACE(format + " " + size);
      const std::string q = dir_.file("q." + format), u = dir_.file("u." + format);
      auto qr = run_command({"qemu-img", "create", "-q", "-f", format, q, "--", size});
      auto ur = run_uqcow({"create", "-q", "-f", format, u, "--", size});
      ASSERT_EQ(qr.exit_code, ur.exit_code) << qr.describe() << ur.describe();
      EXPECT_EQ(message(qr.err), message(ur.err));
      if (!qr.ok()) continue;
      EXPECT_EQ(virtual_size(q), virtual_size(u));
      if (format == "raw") {
        EXPECT_EQ(read_file(q)->size(), read_file(u)->size());
      } else {
        EXPECT_TRUE(Succeeded(run_command({"qemu-img", "check", u})));
      }
    }
  }
}

TEST_F(SizesTest, CreateOptionSizeRoundsUpAndIsGivenOnce) {
  for (const std::string size : {"1000000", "1000001", "511", "4097"}) {
    SCOPED_TRACE(size);
    const std::string q = dir_.file("q.qcow2"), u = dir_.file("u.qcow2");
    ASSERT_TRUE(Succeeded(run_command({"qemu-img", "create", "-q", "-f", "qcow2", "-o", "size=" + size, q})));
    ASSERT_TRUE(Succeeded(run_uqcow({"create", "-q", "-o", "cluster_size=4k,size=" + size, u})));
    EXPECT_EQ(virtual_size(q), virtual_size(u));
  }
  // Both -o size= and SIZE: qemu-img refuses, naming the file.
  auto qr = run_command({"qemu-img", "create", "-q", "-f", "qcow2", "-o", "size=1M", "twice.qcow2", "2M"}, dir_.path());
  auto ur = run_uqcow({"create", "-q", "-o", "size=1M", "twice.qcow2", "2M"}, dir_.path());
  EXPECT_EQ(qr.exit_code, 1);
  EXPECT_EQ(ur.exit_code, qr.exit_code);
  EXPECT_EQ(message(ur.err), message(qr.err));
}

TEST_F(SizesTest, ConvertTargetIsWholeSectors) {
  const std::string src = dir_.file("src.raw");
  ASSERT_TRUE(write_file(src, std::vector<uint8_t>(1000000, 0x5a)));
  for (const std::string format : {"qcow2", "raw"}) {
    SCOPED_TRACE(format);
    const std::string q = dir_.file("q." + format), u = dir_.file("u." + format);
    ASSERT_TRUE(Succeeded(run_command({"qemu-img", "convert", "-f", "raw", "-O", format, src, q})));
    ASSERT_TRUE(Succeeded(run_uqcow({"convert", "-f", "raw", "-O", format, src, u})));
    EXPECT_EQ(virtual_size(q), virtual_size(u));
    EXPECT_TRUE(Succeeded(run_command({"qemu-img", "compare", q, u})));
  }
}

// Arguments after "resize" (the image name is appended before the size).
struct ResizeCase {
  std::vector<std::string> flags;
  std::string size;
};

TEST_F(SizesTest, ResizeRefusesAndReportsLikeQemuImg) {
  const std::vector<ResizeCase> cases = {
      {{}, "70000001"},        {{}, "+1"},         {{}, "-1"},
      {{"--shrink"}, "-1"},    {{"--shrink"}, "-512"}, {{}, "-512"},
      {{}, "abc"},             {{}, "1000000000000000000000"},
      {{}, "-1000000000"},     {{}, "0"},          {{}, "9E"},
      {{}, "64M"},             {{}, "+64k"},       {{}, "70000128"},
      {{"--shrink"}, "1000448"}, {{"--shrink"}, "-64M"}, {{}, "+0"},
  };
  for (const std::string format : {"qcow2", "raw"}) {
    for (const auto& c : cases) {
      SCOPED_TRACE(format + " " + c.size + (c.flags.empty() ? "" : " " + c.flags[0]));
      const std::string q = dir_.file("q." + format), u = dir_.file("u." + format);
      for (const auto& img : {q, u}) {
        ASSERT_TRUE(Succeeded(run_command({"qemu-img", "create", "-q", "-f", format, img, "64M"})));
      }
      std::vector<std::string> qa = {"qemu-img", "resize", "-f", format}, ua = {"resize", "-f", format};
      for (const auto& f : c.flags) qa.push_back(f), ua.push_back(f);
      qa.push_back(q), ua.push_back(u);
      qa.push_back(c.size), ua.push_back(c.size);
      auto qr = run_command(qa);
      auto ur = run_uqcow(ua);
      EXPECT_EQ(qr.exit_code, ur.exit_code) << qr.describe() << ur.describe();
      EXPECT_EQ(message(qr.err), message(ur.err));
      EXPECT_EQ(qr.out, ur.out);
      if (format == "raw") {
        EXPECT_EQ(read_file(q)->size(), read_file(u)->size());
      } else {
        EXPECT_EQ(virtual_size(q), virtual_size(u));
        EXPECT_TRUE(Succeeded(run_command({"qemu-img", "check", u})));
      }
    }
  }
}

// An image whose header holds a size that is not a multiple of 512 (as an
// older uqcow wrote them): QEMU counts whole sectors, and so does uqcow.
TEST_F(SizesTest, UnalignedHeaderSizeCountsWholeSectors) {
  const std::string img = dir_.file("odd.qcow2");
  ASSERT_TRUE(Succeeded(run_command({"qemu-img", "create", "-q", "-f", "qcow2", img, "1M"})));
  ASSERT_TRUE(patch_be64(img, 24, 1000000));
  ASSERT_EQ(virtual_size(img), 999936u);
  auto r = run_uqcow({"info", "--output=json", img});
  ASSERT_TRUE(Succeeded(r));
  EXPECT_NE(r.out.find("\"virtual-size\": 999936"), std::string::npos) << r.out;
}

// Shrinking to a size inside a cluster and growing again: every byte past
// the smaller size reads as zero (qemu-io read -P 0), the bytes before it
// keep their data, and the image is clean. QEMU itself shows the old bytes
// of the partial cluster again here (its shrink keeps them); uqcow zeroes
// them, and also zeroes them when it grows an image that qemu-img shrank.
struct ShrinkGrow {
  std::string options;  // qemu-img create -o
  bool qemu_shrinks;    // qemu-img shrinks, uqcow grows
  bool backing = false;  // over a 4M raw backing file of 0xcd, which the
                         // grown area must not show (QEMU zero-writes it)
};

void PrintTo(const ShrinkGrow& p, std::ostream* os) {
  *os << p.options << (p.qemu_shrinks ? ", qemu-img shrinks" : "") << (p.backing ? ", over a backing file" : "");
}

class ShrinkGrowTest : public SizesTest, public ::testing::WithParamInterface<ShrinkGrow> {};

TEST_P(ShrinkGrowTest, BytesPastTheOldSizeReadAsZero) {
  const auto& p = GetParam();
  const std::string img = dir_.file("s.qcow2");
  constexpr uint64_t kSmall = 1000448;  // inside the 16th 64k cluster
  if (p.backing) {
    const std::string base = dir_.file("base.raw");
    ASSERT_TRUE(Succeeded(run_command({"qemu-img", "create", "-q", "-f", "raw", base, "4M"})));
    ASSERT_TRUE(Succeeded(run_command({"qemu-io", "-f", "raw", "-c", "write -P 0xcd 0 4M", base})));
    ASSERT_TRUE(Succeeded(
        run_command({"qemu-img", "create", "-q", "-f", "qcow2", "-o", p.options, "-b", base, "-F", "raw", img, "4M"})));
  } else {
    ASSERT_TRUE(Succeeded(run_command({"qemu-img", "create", "-q", "-f", "qcow2", "-o", p.options, img, "4M"})));
  }
  ASSERT_TRUE(Succeeded(run_command({"qemu-io", "-c", "write -P 0xab 0 4M", img})));
  if (p.qemu_shrinks) {
    ASSERT_TRUE(Succeeded(run_command({"qemu-img", "resize", "-q", "--shrink", img, std::to_string(kSmall)})));
  } else {
    ASSERT_TRUE(Succeeded(run_uqcow({"resize", "-q", "--shrink", img, std::to_string(kSmall)})));
    EXPECT_TRUE(Succeeded(run_command({"qemu-img", "check", img})));
    EXPECT_EQ(virtual_size(img), kSmall);
  }
  ASSERT_TRUE(Succeeded(run_uqcow({"resize", "-q", img, "2M"})));
  EXPECT_EQ(virtual_size(img), 2u << 20);
  auto r = run_command({"qemu-io", "-c", "read -P 0 " + std::to_string(kSmall) + " " + std::to_string((2u << 20) - kSmall),
                        "-c", "read -P 0xab 0 " + std::to_string(kSmall), img});
  EXPECT_TRUE(Succeeded(r));
  EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos) << r.out;
  EXPECT_TRUE(Succeeded(run_command({"qemu-img", "check", img})));
}

INSTANTIATE_TEST_SUITE_P(Layouts, ShrinkGrowTest,
                         ::testing::Values(ShrinkGrow{"cluster_size=64k", false},
                                           ShrinkGrow{"cluster_size=64k", true},
                                           ShrinkGrow{"cluster_size=64k,extended_l2=on", false},
                                           ShrinkGrow{"cluster_size=64k,compat=0.10", false},
                                           ShrinkGrow{"cluster_size=4k", false},
                                           ShrinkGrow{"cluster_size=64k", false, true},
                                           ShrinkGrow{"cluster_size=64k", true, true},
                                           ShrinkGrow{"cluster_size=32k,extended_l2=on", false, true}));

}  // namespace
}  // namespace uqcow::testing
