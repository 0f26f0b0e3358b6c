// `uqcow snapshot` (-c, -a, -d, -l) against qemu-img as the oracle: after
// every step the image is clean under `qemu-img check` (no errors, no leaks),
// `qemu-img snapshot -l` prints exactly what `uqcow snapshot -l` prints, and
// every snapshot reads back (qemu-img convert -l) as the raw copy of the
// active disk taken when it was made. Snapshots cross between the two tools.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "tests/testutil.h"

namespace uqcow::testing {
namespace {

constexpr uint64_t kMiB = 1 << 20;

struct Layout {
  const char* name;
  const char* options;  // qemu-img create -o
};

class SnapshotTest : public ::testing::TestWithParam<Layout> {
 protected:
  void SetUp() override {
    if (!require_tool("qemu-img") || !require_tool("qemu-io")) return;
    if (uqcow_binary().empty()) GTEST_SKIP() << "UQCOW is not set";
  }

  std::string img(const std::string& name) const { return dir_.file(name); }

  void create(const std::string& path) {
    ASSERT_TRUE(Succeeded(run_command({"qemu-img", "create", "-q", "-f", "qcow2", "-o", GetParam().options, path,
                                       std::to_string(64 * kMiB)})));
  }
  void io(const std::string& path, const std::vector<std::string>& cmds) {
    std::vector<std::string> argv = {"qemu-io", "-f", "qcow2"};
    for (const auto& c : cmds) argv.insert(argv.end(), {"-c", c});
    argv.push_back(path);
    ASSERT_TRUE(Succeeded(run_command(argv)));
  }
  // The raw guest content of the active disk, or of snapshot `snap`.
  std::vector<uint8_t> content(const std::string& path, const std::string& snap = "") {
    std::string out = dir_.file("export.raw");
    std::vector<std::string> argv = {"qemu-img", "convert", "-f", "qcow2"};
    if (!snap.empty()) argv.insert(argv.end(), {"-l", "snapshot.name=" + snap});
    argv.insert(argv.end(), {"-O", "raw", path, out});
    auto r = run_command(argv);
    EXPECT_TRUE(Succeeded(r));
    auto data = read_file(out);
    EXPECT_TRUE(data.has_value());
    return data.value_or(std::vector<uint8_t>{});
  }
  void uqcow(const std::vector<std::string>& args) { ASSERT_TRUE(Succeeded(run_uqcow(args))); }
  void qemu_snapshot(const std::vector<std::string>& args) {
    std::vector<std::string> argv = {"qemu-img", "snapshot"};
    argv.insert(argv.end(), args.begin(), args.end());
    ASSERT_TRUE(Succeeded(run_command(argv)));
  }

  // The invariants after every step; `expected` maps snapshot names (and ""
  // for the active disk) to their content.
  void verify(const std::string& path, const std::vector<std::pair<std::string, const std::vector<uint8_t>*>>& expected,
              const std::string& step) {
    SCOPED_TRACE(step);
    auto check = run_command({"qemu-img", "check", path});
    EXPECT_TRUE(Succeeded(check));
    EXPECT_NE(check.out.find("No errors were found"), std::string::npos) << check.describe();
    EXPECT_EQ(check.out.find("leaked"), std::string::npos) << check.describe();
    auto theirs = run_command({"qemu-img", "snapshot", "-l", path});
    auto ours = run_uqcow({"snapshot", "-l", path});
    EXPECT_TRUE(Succeeded(ours));
    EXPECT_EQ(ours.out, theirs.out);
    size_t snapshots = 0;
    for (const auto& [name, data] : expected) {
      if (!name.empty()) {
        ++snapshots;
        EXPECT_NE(theirs.out.find(" " + name + " "), std::string::npos) << theirs.out;
      }
      EXPECT_TRUE(content(path, name) == *data) << "content of '" << name << "' differs";
    }
    size_t lines = std::count(theirs.out.begin(), theirs.out.end(), '\n');
    EXPECT_EQ(snapshots == 0 ? 0 : snapshots + 2, lines) << theirs.out;
  }

  // Two snapshots over writes, overwrites, compressed data, zeroes and
  // discards; returns the image and the three content points.
  void build(const std::string& path, std::vector<uint8_t>& at_s1, std::vector<uint8_t>& at_s2,
             std::vector<uint8_t>& now) {
    create(path);
    io(path, {"write -P 1 0 1M", "write -P 2 5M 192k", "write -c -P 3 8M 128k"});
    at_s1 = content(path);
    uqcow({"snapshot", "-c", "s1", path});
    verify(path, {{"s1", &at_s1}, {"", &at_s1}}, "after -c s1");
    io(path, {"write -P 4 512k 64k", "write -P 5 20M 64k", "write -P 6 8M 4k", "write -P 7 5M 1k"});
    at_s2 = content(path);
    uqcow({"snapshot", "-c", "s2", path});
    verify(path, {{"s1", &at_s1}, {"s2", &at_s2}, {"", &at_s2}}, "after -c s2");
    io(path, {"write -z 0 256k", "write -z -u 5M 64k", "discard 20M 64k", "write -P 8 40M 64k"});
    now = content(path);
    verify(path, {{"s1", &at_s1}, {"s2", &at_s2}, {"", &now}}, "after zero writes and discards");
  }

  TempDir dir_{"snapshot_test"};
};

TEST_P(SnapshotTest, ApplyThenDeleteOldestFirst) {
  std::string path = img("a.qcow2");
  std::vector<uint8_t> s1, s2, now;
  ASSERT_NO_FATAL_FAILURE(build(path, s1, s2, now));
  uqcow({"snapshot", "-a", "s1", path});
  verify(path, {{"s1", &s1}, {"s2", &s2}, {"", &s1}}, "after -a s1");
  // Writes after apply copy on write: the snapshot keeps its content.
  io(path, {"write -P 9 0 64k", "write -P 10 8M 64k"});
  auto written = content(path);
  verify(path, {{"s1", &s1}, {"s2", &s2}, {"", &written}}, "after writes over s1");
  uqcow({"snapshot", "-d", "s1", path});
  verify(path, {{"s2", &s2}, {"", &written}}, "after -d s1");
  uqcow({"snapshot", "-a", "s2", path});
  verify(path, {{"s2", &s2}, {"", &s2}}, "after -a s2");
  uqcow({"snapshot", "-d", "s2", path});
  verify(path, {{"", &s2}}, "after -d s2");
  EXPECT_EQ(run_uqcow({"snapshot", "-d", "s2", path}).exit_code, 1);
}

TEST_P(SnapshotTest, DeleteNewestThenApply) {
  std::string path = img("b.qcow2");
  std::vector<uint8_t> s1, s2, now;
  ASSERT_NO_FATAL_FAILURE(build(path, s1, s2, now));
  uqcow({"snapshot", "-d", "2", path});  // by id
  verify(path, {{"s1", &s1}, {"", &now}}, "after -d 2");
  uqcow({"snapshot", "-a", "s1", path});
  verify(path, {{"s1", &s1}, {"", &s1}}, "after -a s1");
  uqcow({"snapshot", "-d", "s1", path});
  verify(path, {{"", &s1}}, "after -d s1");
  io(path, {"write -P 11 0 2M"});
  auto last = content(path);
  verify(path, {{"", &last}}, "after writes with no snapshot");
}

TEST_P(SnapshotTest, RefusesDuplicateName) {
  std::string path = img("dup.qcow2");
  create(path);
  uqcow({"snapshot", "-c", "s1", path});
  auto r = run_uqcow({"snapshot", "-c", "s1", path});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("uqcow: "), std::string::npos) << r.err;
  auto empty = content(path);
  verify(path, {{"s1", &empty}, {"", &empty}}, "after the refused -c");
}

TEST_P(SnapshotTest, CrossesWithQemuImg) {
  std::string path = img("x.qcow2");
  create(path);
  io(path, {"write -P 1 0 1M", "write -c -P 2 4M 128k"});
  auto q1 = content(path);
  qemu_snapshot({"-c", "q1", path});
  io(path, {"write -P 3 0 64k"});
  auto u1 = content(path);
  uqcow({"snapshot", "-c", "u1", path});
  io(path, {"write -P 4 64k 64k"});
  auto now = content(path);
  verify(path, {{"q1", &q1}, {"u1", &u1}, {"", &now}}, "mixed snapshots");
  // qemu-img's snapshot applied and deleted by uqcow.
  uqcow({"snapshot", "-a", "q1", path});
  verify(path, {{"q1", &q1}, {"u1", &u1}, {"", &q1}}, "after uqcow -a q1");
  uqcow({"snapshot", "-d", "q1", path});
  verify(path, {{"u1", &u1}, {"", &q1}}, "after uqcow -d q1");
  // uqcow's snapshot applied and deleted by qemu-img.
  qemu_snapshot({"-a", "u1", path});
  verify(path, {{"u1", &u1}, {"", &u1}}, "after qemu-img -a u1");
  qemu_snapshot({"-d", "u1", path});
  verify(path, {{"", &u1}}, "after qemu-img -d u1");
}

INSTANTIATE_TEST_SUITE_P(Layouts, SnapshotTest,
                         ::testing::Values(Layout{"c64k", "cluster_size=64k"},
                                           Layout{"c4k_rc8", "cluster_size=4k,refcount_bits=8"},
                                           Layout{"extl2", "extended_l2=on"},
                                           Layout{"compat010", "compat=0.10"}),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace uqcow::testing
