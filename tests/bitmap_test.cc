// Persistent dirty bitmaps through the CLI (issue 15), with QEMU 7.2's tools
// as the oracle: `uqcow bitmap` beside `qemu-img bitmap` on twin copies of
// one image (exit code, message, `qemu-img info` bitmaps, dirty extents as
// qemu-nbd -B exports them and nbdinfo --map reads them), writes through
// `uqcow io` tracked as qemu-io's are, `uqcow info` beside `qemu-img info`,
// `convert --bitmaps` beside qemu-img's, and resize of images with bitmaps.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <regex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "tests/nbd_client.h"
#include "tests/testutil.h"

namespace uqcow::testing {
namespace {

using Extents = std::vector<std::pair<uint64_t, uint64_t>>;  // dirty (offset, length), merged

// stderr without the tools' "qemu-img: " / "uqcow: " line prefixes, and with
// the node name qemu-img prints (an internal counter, "#block123") written
// as the file name uqcow prints in its place.
std::string message(const std::string& err, const std::string& file) {
  static const std::regex prefix("(^|\n)(qemu-img|uqcow): ");
  std::string m = std::regex_replace(err, prefix, "$1");
  return std::regex_replace(m, std::regex("#block[0-9]+"), file);
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (size_t pos = 0; (pos = s.find(from, pos)) != std::string::npos; pos += to.size()) s.replace(pos, from.size(), to);
  return s;
}

CommandResult qemu_img(const std::vector<std::string>& args, const std::string& cwd) {
  std::vector<std::string> argv = {"qemu-img"};
  argv.insert(argv.end(), args.begin(), args.end());
  return run_command(argv, cwd);
}

// The "bitmaps" member of `qemu-img info --output=json` as printed, "" when
// there is none.
std::string bitmaps_json(const std::string& path) {
  auto r = run_command({"qemu-img", "info", "--output=json", path});
  EXPECT_TRUE(Succeeded(r));
  const auto start = r.out.find("\"bitmaps\": [");
  if (start == std::string::npos) return "";
  // The list closes at the first "]" at its own indentation (12 spaces).
  const auto end = r.out.find("\n            ]", start);
  return r.out.substr(start, end == std::string::npos ? std::string::npos : end - start);
}

struct BitmapFacts {
  std::string name;
  bool in_use;
};

// Names and in-use flags of the bitmaps qemu-img sees.
std::vector<BitmapFacts> bitmap_facts(const std::string& path) {
  std::vector<BitmapFacts> out;
  const std::string json = bitmaps_json(path);
  static const std::regex entry("\"flags\": \\[([^\\]]*)\\],\\s*\"name\": \"([^\"]*)\"");
  for (std::sregex_iterator it(json.begin(), json.end(), entry), end; it != end; ++it) {
    out.push_back({(*it)[2], (*it)[1].str().find("in-use") != std::string::npos});
  }
  return out;
}

// The dirty extents of bitmap `name` as qemu-nbd exports them
// (qemu:dirty-bitmap:NAME), read by nbdinfo --map, which starts the server
// itself (socket activation) and waits for it to exit.
Extents dirty_extents(const std::string& path, const std::string& name) {
  auto r = run_command({"nbdinfo", "--map=qemu:dirty-bitmap:" + name, "--", "[", "qemu-nbd", "-r", "-f", "qcow2",
                        "-B", name, path, "]"});
  EXPECT_TRUE(Succeeded(r)) << name;
  Extents out;
  std::istringstream lines(r.out);
  uint64_t offset, length;
  int type;
  std::string what;
  while (lines >> offset >> length >> type >> what) {
    if (!(type & 1)) continue;
    if (!out.empty() && out.back().first + out.back().second == offset) out.back().second += length;
    else out.emplace_back(offset, length);
  }
  return out;
}

// Every usable bitmap's extents, by name, for comparing two images.
std::vector<std::pair<std::string, Extents>> all_extents(const std::string& path) {
  std::vector<std::pair<std::string, Extents>> out;
  for (const auto& b : bitmap_facts(path)) {
    if (!b.in_use) out.emplace_back(b.name, dirty_extents(path, b.name));
  }
  return out;
}

// The granules of `granularity` bytes that the ranges touch, merged, cut at
// `disk_size`: what a bitmap that saw those writes must show.
Extents granules(const Extents& ranges, uint64_t granularity, uint64_t disk_size) {
  Extents g;
  for (auto [off, len] : ranges) {
    const uint64_t start = off / granularity * granularity;
    const uint64_t end = std::min(disk_size, (off + len + granularity - 1) / granularity * granularity);
    g.emplace_back(start, end - start);
  }
  std::sort(g.begin(), g.end());
  Extents out;
  for (auto [off, len] : g) {
    if (!out.empty() && out.back().first + out.back().second >= off) {
      out.back().second = std::max(out.back().first + out.back().second, off + len) - out.back().first;
    } else {
      out.emplace_back(off, len);
    }
  }
  return out;
}

class BitmapTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* tool : {"qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"}) {
      if (!require_tool(tool)) return;
    }
    ASSERT_FALSE(uqcow_binary().empty()) << "UQCOW is not set";
  }

  // The images the twin cases start from (64 MiB unless named otherwise):
  // empty (v3, no bitmaps); marked: b0 (64k, enabled) and d4 (4k, disabled
  // after some writes), with dirty bits; other: bitmap s (512 B granules)
  // with dirty bits; small (32 MiB): bitmap s; crashed: `marked` after a
  // writer aborted (both bitmaps IN_USE); v2 (compat 0.10); c512 and c2m
  // (512 B and 2 MiB clusters); raw.img.
  void build_bases() {
    ImageBuilder b(dir_.path());
    b.create("empty.qcow2", "qcow2", "", 64 << 20);
    b.create("marked.qcow2", "qcow2", "", 64 << 20);
    b.run({"qemu-img", "bitmap", "--add", "marked.qcow2", "b0"});
    b.run({"qemu-img", "bitmap", "--add", "-g", "4k", "marked.qcow2", "d4"});
    b.write("marked.qcow2", "qcow2", {P(0, 4096, 1), P(1 << 20, 4096, 2)});
    b.run({"qemu-img", "bitmap", "--disable", "marked.qcow2", "d4"});
    b.write("marked.qcow2", "qcow2", {P(2 << 20, 70000, 3)});
    b.create("other.qcow2", "qcow2", "", 64 << 20);
    b.run({"qemu-img", "bitmap", "--add", "-g", "512", "other.qcow2", "s"});
    b.write("other.qcow2", "qcow2", {P(5 << 20, 1536, 4), P(40 << 20, 512, 5)});
    b.create("small.qcow2", "qcow2", "", 32 << 20);
    b.run({"qemu-img", "bitmap", "--add", "small.qcow2", "s"});
    b.run({"cp", "marked.qcow2", "crashed.qcow2"});
    b.write("crashed.qcow2", "qcow2", {P(0, 65536, 6)}, {"abort"}, /*expect_failure=*/true);
    b.create("v2.qcow2", "qcow2", "compat=0.10", 64 << 20);
    b.create("c512.qcow2", "qcow2", "cluster_size=512", 64 << 20);
    b.create("c2m.qcow2", "qcow2", "cluster_size=2M", 64 << 20);
    b.create("raw.img", "raw", "", 64 << 20);
    ASSERT_TRUE(b.ok()) << b.error() << "\n" << b.script();
  }

  std::string path(const std::string& name) const { return dir_.file(name); }

  TempDir dir_{"bitmap"};
};

// One `bitmap` invocation run by both tools on twin copies of `base`.
// "IMG" in the arguments is the copy; `uqcow_args`, when given, replaces
// `args` for uqcow (its spellings qemu-img lacks).
struct TwinCase {
  std::string base;
  std::vector<std::string> args;
  int exit_code;
  bool same_message = true;  // false: the inner open error is worded differently
  std::vector<std::string> uqcow_args = {};
};

std::vector<std::string> with_image(std::vector<std::string> args, const std::string& image) {
  for (auto& a : args) {
    if (a == "IMG") a = image;
  }
  return args;
}

std::string joined(const std::vector<std::string>& args) {
  std::string s;
  for (const auto& a : args) s += (s.empty() ? "" : " ") + (a.size() > 40 ? a.substr(0, 40) + "..." : a);
  return s;
}

const std::string kLong1023(1023, 'x');
const std::string kLong1024(1024, 'x');

const std::vector<TwinCase> kTwinCases = {
    // Each action alone.
    {"empty.qcow2", {"--add", "IMG", "n"}, 0},
    {"c512.qcow2", {"--add", "IMG", "n"}, 0},  // default granularity: 4k
    {"c2m.qcow2", {"--add", "IMG", "n"}, 0},   // default granularity: 64k
    {"empty.qcow2", {"--add", "-g", "4k", "IMG", "n"}, 0},
    {"empty.qcow2", {"-g", "512", "--add", "IMG", "n"}, 0},
    {"empty.qcow2", {"--add", "-g", "2G", "IMG", "n"}, 0},
    {"empty.qcow2", {"--add", "-g", "4294967808", "IMG", "n"}, 0},  // QMP's uint32: 512
    {"empty.qcow2", {"--add", "-g", "0", "IMG", "n"}, 0},           // 0: the default
    {"empty.qcow2", {"--add", "--disable", "IMG", "n"}, 0},
    {"empty.qcow2", {"--add", "--disable", "IMG", "n"}, 0, true, {"--add", "--disabled", "IMG", "n"}},
    {"empty.qcow2", {"--add", "IMG", kLong1023}, 0},
    {"marked.qcow2", {"--remove", "IMG", "b0"}, 0},
    {"marked.qcow2", {"--clear", "IMG", "b0"}, 0},
    {"marked.qcow2", {"--enable", "IMG", "d4"}, 0},
    {"marked.qcow2", {"--disable", "IMG", "b0"}, 0},
    {"marked.qcow2", {"--merge", "d4", "IMG", "b0"}, 0},
    {"marked.qcow2", {"--merge", "b0", "IMG", "d4"}, 0},
    {"marked.qcow2", {"--merge", "b0", "IMG", "b0"}, 0},
    {"marked.qcow2", {"--merge", "s", "-b", "other.qcow2", "IMG", "b0"}, 0},
    {"marked.qcow2", {"--merge", "s", "-b", "other.qcow2", "-F", "qcow2", "IMG", "d4"}, 0},
    {"crashed.qcow2", {"--remove", "IMG", "b0"}, 0},
    // Several actions, in order.
    {"empty.qcow2", {"--add", "--remove", "--add", "-g", "4k", "--disable", "IMG", "x"}, 0},
    {"marked.qcow2", {"--disable", "--enable", "--enable", "--disable", "--disable", "IMG", "b0"}, 0},
    {"marked.qcow2", {"-g", "8k", "--add", "--merge", "b0", "--merge", "d4", "--disable", "IMG", "n"}, 0},
    {"marked.qcow2", {"--clear", "--merge", "s", "-b", "other.qcow2", "--enable", "IMG", "d4"}, 0},
    {"crashed.qcow2", {"--remove", "--add", "--merge", "d4", "IMG", "b0"}, 1},  // d4 is inconsistent
    {"crashed.qcow2", {"--remove", "--add", "IMG", "b0"}, 0},
    // A failure stops the sequence; what came before is still written.
    {"marked.qcow2", {"--add", "--add", "IMG", "y"}, 1},
    {"marked.qcow2", {"--clear", "--remove", "--remove", "IMG", "b0"}, 1},
    // The command line.
    {"empty.qcow2", {"--add", "IMG"}, 1},
    {"empty.qcow2", {"IMG", "b0"}, 1},
    {"empty.qcow2", {"--add", "IMG", "b0", "extra"}, 1},
    {"marked.qcow2", {"-g", "64k", "--remove", "IMG", "b0"}, 1},
    {"marked.qcow2", {"-g", "0", "--remove", "IMG", "b0"}, 0},
    {"empty.qcow2", {"-F", "qcow2", "--add", "IMG", "b1"}, 1},
    {"empty.qcow2", {"-b", "other.qcow2", "--add", "IMG", "b1"}, 1},
    {"empty.qcow2", {"-g", "abc", "--add", "IMG", "b1"}, 1},
    {"empty.qcow2", {"-g", "-5", "--add", "IMG", "b1"}, 1},
    {"empty.qcow2", {"-g", "9E", "--add", "IMG", "b1"}, 1},
    {"empty.qcow2", {"--merge"}, 1, false},
    {"empty.qcow2", {"--bogus", "IMG", "b1"}, 1, false},
    // The actions' refusals.
    {"marked.qcow2", {"--add", "IMG", "b0"}, 1},
    {"marked.qcow2", {"--remove", "IMG", "nope"}, 1},
    {"marked.qcow2", {"--clear", "IMG", "nope"}, 1},
    {"marked.qcow2", {"--enable", "IMG", "nope"}, 1},
    {"marked.qcow2", {"--disable", "IMG", "nope"}, 1},
    {"marked.qcow2", {"--merge", "nope", "IMG", "b0"}, 1},
    {"marked.qcow2", {"--merge", "b0", "IMG", "nope"}, 1},
    {"marked.qcow2", {"--merge", "s", "-b", "small.qcow2", "IMG", "b0"}, 1},
    {"marked.qcow2", {"--merge", "s", "-b", "other.qcow2", "-F", "raw", "IMG", "b0"}, 1},
    {"marked.qcow2", {"--merge", "s", "-b", "nonexistent.qcow2", "IMG", "b0"}, 1, false},
    {"marked.qcow2", {"--merge", "b0", "-b", "crashed.qcow2", "IMG", "d4"}, 1},
    {"empty.qcow2", {"--add", "IMG", ""}, 1},
    {"empty.qcow2", {"--add", "IMG", kLong1024}, 1},
    {"empty.qcow2", {"--add", "-g", "1000", "IMG", "b1"}, 1},
    {"empty.qcow2", {"--add", "-g", "256", "IMG", "b1"}, 1},
    {"empty.qcow2", {"--add", "-g", "4G", "IMG", "b1"}, 1},  // QMP's uint32: 0
    {"v2.qcow2", {"--add", "IMG", "b0"}, 1},
    {"v2.qcow2", {"--remove", "IMG", "b0"}, 1},
    {"raw.img", {"-f", "raw", "--add", "IMG", "b0"}, 1},
    {"raw.img", {"-f", "raw", "--clear", "IMG", "b0"}, 1},
    {"crashed.qcow2", {"--clear", "IMG", "b0"}, 1},
    {"crashed.qcow2", {"--enable", "IMG", "b0"}, 1},
    {"crashed.qcow2", {"--disable", "IMG", "b0"}, 1},
    {"crashed.qcow2", {"--add", "IMG", "b0"}, 1},
    {"crashed.qcow2", {"--merge", "b0", "IMG", "d4"}, 1},
    {"crashed.qcow2", {"--merge", "d4", "IMG", "b0"}, 1},
    {"nonexistent.qcow2", {"--add", "IMG", "b0"}, 1, false},
};

TEST_F(BitmapTest, EveryActionAsQemuImg) {
  build_bases();
  for (const TwinCase& c : kTwinCases) {
    SCOPED_TRACE(c.base + ": bitmap " + joined(c.args));
    const std::string q = "q-" + c.base, u = "u-" + c.base;
    if (std::filesystem::exists(path(c.base))) {
      std::filesystem::copy_file(path(c.base), path(q), std::filesystem::copy_options::overwrite_existing);
      std::filesystem::copy_file(path(c.base), path(u), std::filesystem::copy_options::overwrite_existing);
    }
    std::vector<std::string> qargs = with_image(c.args, q);
    qargs.insert(qargs.begin(), "bitmap");
    std::vector<std::string> uargs = with_image(c.uqcow_args.empty() ? c.args : c.uqcow_args, u);
    uargs.insert(uargs.begin(), "bitmap");
    auto qr = qemu_img(qargs, dir_.path());
    auto ur = run_uqcow(uargs, dir_.path());
    ASSERT_EQ(qr.exit_code, c.exit_code) << "qemu-img's own decision changed: " << qr.describe();
    EXPECT_EQ(ur.exit_code, c.exit_code) << ur.describe();
    if (c.same_message) {
      EXPECT_EQ(message(ur.err, u), replace_all(message(qr.err, q), q, u));
    } else if (!qr.ok()) {
      EXPECT_FALSE(ur.err.empty());
    }
    if (!std::filesystem::exists(path(c.base))) continue;
    EXPECT_EQ(bitmaps_json(path(u)), bitmaps_json(path(q)));
    EXPECT_EQ(all_extents(path(u)), all_extents(path(q)));
    if (c.base.ends_with(".qcow2")) {
      EXPECT_TRUE(Succeeded(qemu_img({"check", u}, dir_.path())));
    }
  }
}

// qemu-img's open errors, word for word once the node names are aside: an
// image another process has open for writing, and one the user may not
// write (run as nobody on a 0444 file; root ignores the mode).
TEST_F(BitmapTest, LockedImageRefusedAsQemuImg) {
  build_bases();
  SocketDir socket;
  auto holder = ServeProcess::command({"qemu-nbd", "-t", "-f", "qcow2", "-k", socket.socket(), path("marked.qcow2")},
                                      socket.socket());
  ASSERT_TRUE(holder->wait_ready());
  auto qr = qemu_img({"bitmap", "--add", "marked.qcow2", "n"}, dir_.path());
  auto ur = run_uqcow({"bitmap", "--add", "marked.qcow2", "n"}, dir_.path());
  EXPECT_EQ(qr.exit_code, 1) << qr.describe();
  EXPECT_EQ(ur.exit_code, 1) << ur.describe();
  EXPECT_EQ(message(ur.err, ""), message(qr.err, ""));
  EXPECT_NE(ur.err.find("Failed to get \"write\" lock"), std::string::npos) << ur.err;
  EXPECT_EQ(holder->terminate(), 0);
}

TEST_F(BitmapTest, ReadOnlyFileRefusedAsQemuImg) {
  if (geteuid() != 0 || !find_tool("setpriv")) GTEST_SKIP() << "needs root and setpriv to run as nobody";
  // Under /tmp: nobody must reach the file (the test's own directory may sit
  // under a home directory nobody cannot enter).
  TempDir dir("bitmap-ro", "/tmp");
  ASSERT_EQ(chmod(dir.path().c_str(), 0755), 0);
  ASSERT_TRUE(Succeeded(qemu_img({"create", "-q", "-f", "qcow2", "ro.qcow2", "16M"}, dir.path())));
  ASSERT_EQ(chmod(dir.file("ro.qcow2").c_str(), 0444), 0);
  const std::vector<std::string> as_nobody = {"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"};
  std::vector<std::string> probe = as_nobody;
  probe.push_back("true");
  if (!run_command(probe).ok()) GTEST_SKIP() << "cannot run as nobody here (a user namespace without uid 65534?)";
  auto cmd = [&](const std::string& tool) {
    std::vector<std::string> argv = as_nobody;
    argv.insert(argv.end(), {tool, "bitmap", "--add", "ro.qcow2", "b0"});
    return run_command(argv, dir.path());
  };
  auto qr = cmd("qemu-img");
  auto ur = cmd(uqcow_binary());
  EXPECT_EQ(qr.exit_code, 1) << qr.describe();
  EXPECT_EQ(ur.exit_code, 1) << ur.describe();
  // qemu-img: "Could not open 'ro.qcow2': Could not open 'ro.qcow2':
  // Permission denied"; uqcow names its own open call in the middle.
  for (const auto* r : {&qr, &ur}) {
    EXPECT_NE(r->err.find("Could not open 'ro.qcow2': "), std::string::npos) << r->err;
    EXPECT_NE(r->err.find("Permission denied"), std::string::npos) << r->err;
  }
  EXPECT_EQ(bitmaps_json(dir.file("ro.qcow2")), "");
}

const std::vector<std::string> kWrites = {"write -P 0x11 100k 8k", "write -z 1M 64k", "discard 4M 128k",
                                          "write -c 8M 64k", "write 20M 512", "write -z -u 30M 200k"};
const Extents kWritten = {{100 << 10, 8 << 10}, {1 << 20, 64 << 10},   {4 << 20, 128 << 10},
                          {8 << 20, 64 << 10},  {20 << 20, 512},       {30 << 20, 200 << 10}};

// Adds b0 (64k), b4 (4k) and the disabled d with `adder`, writes kWrites with
// `writer`; then the bitmaps must be there as added, qemu-img check clean,
// and the extents exactly the granules written (none in d).
void check_tracking(const std::string& dir, const std::string& img, const std::string& adder,
                    const std::string& writer) {
  SCOPED_TRACE(adder + " adds, " + writer + " writes");
  auto tool = [&](const std::string& name, std::vector<std::string> args) {
    if (name == "uqcow") return run_uqcow(args, dir);
    args.insert(args.begin(), name);
    return run_command(args, dir);
  };
  ASSERT_TRUE(Succeeded(tool(adder == "uqcow" ? "uqcow" : "qemu-img", {"bitmap", "--add", img, "b0"})));
  ASSERT_TRUE(Succeeded(tool(adder == "uqcow" ? "uqcow" : "qemu-img", {"bitmap", "--add", "-g", "4k", img, "b4"})));
  ASSERT_TRUE(Succeeded(tool(adder == "uqcow" ? "uqcow" : "qemu-img", {"bitmap", "--add", "--disable", img, "d"})));
  std::vector<std::string> io = writer == "uqcow" ? std::vector<std::string>{"io"} : std::vector<std::string>{};
  for (const auto& w : kWrites) io.insert(io.end(), {"-c", w});
  io.push_back(img);
  ASSERT_TRUE(Succeeded(tool(writer == "uqcow" ? "uqcow" : "qemu-io", io)));
  const std::string p = dir + "/" + img;
  auto facts = bitmap_facts(p);
  ASSERT_EQ(facts.size(), 3u) << bitmaps_json(p);
  for (const auto& f : facts) EXPECT_FALSE(f.in_use) << f.name;
  EXPECT_TRUE(Succeeded(run_command({"qemu-img", "check", p})));
  EXPECT_EQ(dirty_extents(p, "b0"), granules(kWritten, 64 << 10, 64 << 20));
  EXPECT_EQ(dirty_extents(p, "b4"), granules(kWritten, 4 << 10, 64 << 20));
  EXPECT_EQ(dirty_extents(p, "d"), Extents{});
}

TEST_F(BitmapTest, WritesThroughUqcowAreTracked) {
  ASSERT_TRUE(Succeeded(qemu_img({"create", "-q", "-f", "qcow2", "w.qcow2", "64M"}, dir_.path())));
  check_tracking(dir_.path(), "w.qcow2", "qemu-img", "uqcow");
}

TEST_F(BitmapTest, BitmapsAddedByUqcowTrackQemuWrites) {
  ASSERT_TRUE(Succeeded(qemu_img({"create", "-q", "-f", "qcow2", "u.qcow2", "64M"}, dir_.path())));
  ASSERT_TRUE(Succeeded(qemu_img({"create", "-q", "-f", "qcow2", "q.qcow2", "64M"}, dir_.path())));
  check_tracking(dir_.path(), "u.qcow2", "uqcow", "qemu-io");
  check_tracking(dir_.path(), "q.qcow2", "qemu-img", "qemu-io");
  EXPECT_EQ(bitmaps_json(path("u.qcow2")), bitmaps_json(path("q.qcow2")));
  EXPECT_EQ(all_extents(path("u.qcow2")), all_extents(path("q.qcow2")));
}

// `uqcow info`, human and JSON, equals qemu-img's on the same file.
TEST_F(BitmapTest, InfoAsQemuImg) {
  build_bases();
  ASSERT_TRUE(Succeeded(qemu_img({"bitmap", "--remove", "small.qcow2", "s"}, dir_.path())));  // none left
  for (const char* name : {"empty.qcow2", "marked.qcow2", "other.qcow2", "crashed.qcow2", "small.qcow2"}) {
    SCOPED_TRACE(name);
    for (const char* output : {"--output=human", "--output=json"}) {
      auto qr = qemu_img({"info", output, name}, dir_.path());
      auto ur = run_uqcow({"info", output, name}, dir_.path());
      ASSERT_TRUE(Succeeded(qr));
      ASSERT_TRUE(Succeeded(ur));
      EXPECT_EQ(ur.out, qr.out);
    }
  }
  // What the comparison covers: in-use and disabled bitmaps are shown.
  auto crashed = run_uqcow({"info", "crashed.qcow2"}, dir_.path());
  EXPECT_NE(crashed.out.find("                [0]: in-use\n                [1]: auto\n"), std::string::npos)
      << crashed.out;
  EXPECT_EQ(run_uqcow({"info", "empty.qcow2"}, dir_.path()).out.find("bitmaps"), std::string::npos);
}

// convert --bitmaps beside qemu-img convert --bitmaps: the same bitmaps and
// extents on the target, and the same refusals.
TEST_F(BitmapTest, ConvertBitmapsAsQemuImg) {
  build_bases();
  ASSERT_TRUE(Succeeded(qemu_img({"bitmap", "--add", "-g", "512", "marked.qcow2", "c"}, dir_.path())));
  ASSERT_TRUE(Succeeded(run_command({"qemu-io", "-c", "write 3M 1k", path("marked.qcow2")})));
  struct Case {
    std::string src;
    std::vector<std::string> args;  // before SRC DST
    int exit_code;
  } cases[] = {
      {"marked.qcow2", {"-O", "qcow2", "--bitmaps"}, 0},
      {"marked.qcow2", {"-O", "qcow2", "--bitmaps", "-c"}, 0},
      {"marked.qcow2", {"-O", "qcow2", "-o", "cluster_size=4k", "--bitmaps"}, 0},
      {"other.qcow2", {"-O", "qcow2", "--bitmaps", "--skip-broken-bitmaps"}, 0},
      {"empty.qcow2", {"-O", "qcow2", "--bitmaps"}, 0},
      {"crashed.qcow2", {"-O", "qcow2", "--bitmaps"}, 1},
      {"crashed.qcow2", {"-O", "qcow2", "--bitmaps", "--skip-broken-bitmaps"}, 0},
      {"marked.qcow2", {"-O", "qcow2", "--skip-broken-bitmaps"}, 1},
      {"marked.qcow2", {"-O", "raw", "--bitmaps"}, 1},
      {"marked.qcow2", {"-O", "qcow2", "-o", "compat=0.10", "--bitmaps"}, 1},
      {"raw.img", {"-f", "raw", "-O", "qcow2", "--bitmaps"}, 1},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.src + ": convert " + joined(c.args));
    std::vector<std::string> qargs = {"convert"}, uargs = {"convert"};
    qargs.insert(qargs.end(), c.args.begin(), c.args.end());
    uargs.insert(uargs.end(), c.args.begin(), c.args.end());
    qargs.insert(qargs.end(), {c.src, "q-out"});
    uargs.insert(uargs.end(), {c.src, "u-out"});
    std::filesystem::remove(path("q-out"));
    std::filesystem::remove(path("u-out"));
    auto qr = qemu_img(qargs, dir_.path());
    auto ur = run_uqcow(uargs, dir_.path());
    ASSERT_EQ(qr.exit_code, c.exit_code) << "qemu-img's own decision changed: " << qr.describe();
    EXPECT_EQ(ur.exit_code, c.exit_code) << ur.describe();
    EXPECT_EQ(message(ur.err, ""), message(qr.err, ""));
    if (!qr.ok()) continue;
    EXPECT_EQ(bitmaps_json(path("u-out")), bitmaps_json(path("q-out")));
    EXPECT_EQ(all_extents(path("u-out")), all_extents(path("q-out")));
    EXPECT_TRUE(Succeeded(qemu_img({"check", "u-out"}, dir_.path())));
    EXPECT_TRUE(Succeeded(qemu_img({"compare", "u-out", c.src}, dir_.path())));
  }
  // What the comparison covers: the source's bitmaps arrived, with bits.
  ASSERT_TRUE(Succeeded(run_uqcow({"convert", "-O", "qcow2", "--bitmaps", "marked.qcow2", "u-out"}, dir_.path())));
  EXPECT_EQ(dirty_extents(path("u-out"), "c"), (Extents{{3 << 20, 1024}}));
  EXPECT_EQ(bitmaps_json(path("u-out")), bitmaps_json(path("marked.qcow2")));
}

// resize of an image with bitmaps: the bitmaps follow the size as with
// qemu-img resize; an inconsistent bitmap refuses it as qemu-img does.
TEST_F(BitmapTest, ResizeAsQemuImg) {
  build_bases();
  for (const char* f : {"q.qcow2", "u.qcow2"}) {
    std::filesystem::copy_file(path("marked.qcow2"), path(f));
  }
  for (const std::vector<std::string>& step : {std::vector<std::string>{"100M"}, {"--shrink", "2M"}, {"3000k"}}) {
    SCOPED_TRACE("resize " + joined(step));
    std::vector<std::string> qargs = {"resize"}, uargs = {"resize"};
    qargs.insert(qargs.end(), step.begin(), step.end() - 1);
    uargs.insert(uargs.end(), step.begin(), step.end() - 1);
    qargs.insert(qargs.end(), {"q.qcow2", step.back()});
    uargs.insert(uargs.end(), {"u.qcow2", step.back()});
    ASSERT_TRUE(Succeeded(qemu_img(qargs, dir_.path())));
    ASSERT_TRUE(Succeeded(run_uqcow(uargs, dir_.path())));
    EXPECT_EQ(bitmaps_json(path("u.qcow2")), bitmaps_json(path("q.qcow2")));
    EXPECT_EQ(all_extents(path("u.qcow2")), all_extents(path("q.qcow2")));
    EXPECT_TRUE(Succeeded(qemu_img({"check", "u.qcow2"}, dir_.path())));
  }
  // The bits written before survive where the disk still has them.
  EXPECT_EQ(dirty_extents(path("u.qcow2"), "b0"), (Extents{{0, 64 << 10}, {1 << 20, 64 << 10}}));

  for (const char* f : {"qc.qcow2", "uc.qcow2"}) {
    std::filesystem::copy_file(path("crashed.qcow2"), path(f));
  }
  const auto before = bitmaps_json(path("uc.qcow2"));
  auto qr = qemu_img({"resize", "qc.qcow2", "128M"}, dir_.path());
  auto ur = run_uqcow({"resize", "uc.qcow2", "128M"}, dir_.path());
  EXPECT_EQ(qr.exit_code, 1) << qr.describe();
  EXPECT_EQ(ur.exit_code, qr.exit_code) << ur.describe();
  // The first line is QEMU's; the hint names uqcow's command.
  auto first_line = [](const std::string& err) { return err.substr(0, err.find('\n')); };
  EXPECT_EQ(message(first_line(ur.err), ""), message(first_line(qr.err), ""));
  EXPECT_EQ(bitmaps_json(path("uc.qcow2")), before);
  auto info = run_command({"qemu-img", "info", "--output=json", path("uc.qcow2")});
  EXPECT_NE(info.out.find("\"virtual-size\": 67108864,"), std::string::npos) << info.out;
}

}  // namespace
}  // namespace uqcow::testing
