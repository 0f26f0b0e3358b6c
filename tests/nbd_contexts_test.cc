// NBD metadata contexts of `uqcow serve` against qemu-nbd 7.2 as the oracle:
// the same image served by both, read by nbdinfo (libnbd), must list the
// same contexts and map each of them to the same extents. The images are
// built by qemu-img and qemu-io; the bitmaps are qemu-img's.
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "tests/nbd_client.h"
#include "tests/testutil.h"

namespace uqcow::testing {
namespace {

constexpr uint64_t K = 1024, M = 1024 * K;

// (start, length, value) with adjacent extents of one value merged.
using Extents = std::vector<std::tuple<uint64_t, uint64_t, unsigned>>;

// nbdinfo --map lines are "start length value description..."; the
// description (several words for some contexts) is ignored.
::testing::AssertionResult ParseMap(const CommandResult& r, Extents* out) {
  if (!r.ok()) return ::testing::AssertionFailure() << r.describe();
  out->clear();
  std::istringstream lines(r.out);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream fields(line);
    uint64_t start, length;
    unsigned value;
    if (!(fields >> start >> length >> value)) return ::testing::AssertionFailure() << "bad line: " << line;
    if (!out->empty() && std::get<2>(out->back()) == value &&
        std::get<0>(out->back()) + std::get<1>(out->back()) == start) {
      std::get<1>(out->back()) += length;
    } else {
      out->emplace_back(start, length, value);
    }
  }
  return ::testing::AssertionSuccess();
}

// The "contexts:" lines of nbdinfo --list, in the order listed.
std::vector<std::string> listed_contexts(const std::string& uri) {
  auto r = run_command({"nbdinfo", "--list", uri});
  EXPECT_TRUE(Succeeded(r));
  std::vector<std::string> contexts;
  std::istringstream lines(r.out);
  std::string line;
  bool in_contexts = false;
  while (std::getline(lines, line)) {
    if (line == "\tcontexts:") {
      in_contexts = true;
    } else if (in_contexts && line.rfind("\t\t", 0) == 0) {
      contexts.push_back(line.substr(2));
    } else {
      in_contexts = false;
    }
  }
  return contexts;
}

std::string describe(const Extents& e) {
  std::ostringstream s;
  for (auto [start, length, value] : e) s << "  " << start << " +" << length << " = " << value << "\n";
  return s.str();
}

class NbdContextsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* tool : {"nbdinfo", "qemu-img", "qemu-io", "qemu-nbd"}) {
      if (!require_tool(tool)) return;
    }
    ASSERT_FALSE(uqcow_binary().empty()) << "$UQCOW is not set";
    ASSERT_TRUE(socket_dir_.ok());
  }

  // `uqcow serve --socket S ARGS... IMAGE` or `qemu-nbd -t -f qcow2 -k S
  // ARGS... IMAGE`, running until the next serve() or the end of the test.
  ::testing::AssertionResult serve(bool qemu, const std::vector<std::string>& args, const std::string& image) {
    server_.reset();
    if (qemu) {
      std::vector<std::string> argv = {"qemu-nbd", "-t", "-f", "qcow2", "-k", socket_dir_.socket()};
      argv.insert(argv.end(), args.begin(), args.end());
      argv.push_back(image);
      server_ = ServeProcess::command(argv, socket_dir_.socket());
    } else {
      server_ = std::make_unique<ServeProcess>(image, socket_dir_.socket(), args);
    }
    if (!server_->wait_ready()) return ::testing::AssertionFailure() << (qemu ? "qemu-nbd" : "uqcow serve") << " not ready";
    return ::testing::AssertionSuccess();
  }
  // SIGTERM to the server: it must exit 0 (uqcow then has closed the image).
  void stop() {
    ASSERT_TRUE(server_);
    EXPECT_EQ(server_->terminate(), 0);
    server_.reset();
  }
  ::testing::AssertionResult map(const std::string& context, Extents* out) {
    return ParseMap(run_command({"nbdinfo", "--map=" + context, socket_dir_.uri()}), out);
  }

  // For `contexts`, the listing and each context's map from qemu-nbd and
  // from uqcow serve, both run with `args` on `image`, read-only.
  void expect_same_as_qemu_nbd(const std::vector<std::string>& args, const std::string& image,
                               const std::vector<std::string>& contexts, std::vector<Extents>* maps = nullptr) {
    std::vector<std::string> listed[2];
    std::vector<Extents> got[2];
    for (int qemu : {1, 0}) {
      std::vector<std::string> ro = args;
      ro.push_back("-r");
      ASSERT_TRUE(serve(qemu, ro, image));
      listed[qemu] = listed_contexts(socket_dir_.uri());
      for (const std::string& context : contexts) {
        got[qemu].emplace_back();
        ASSERT_TRUE(map(context, &got[qemu].back())) << context;
      }
      ASSERT_NO_FATAL_FAILURE(stop());
    }
    EXPECT_EQ(listed[0], listed[1]) << "nbdinfo --list: uqcow serve, then qemu-nbd";
    for (size_t i = 0; i < contexts.size(); ++i) {
      EXPECT_EQ(got[0][i], got[1][i]) << contexts[i] << ": uqcow serve\n"
                                      << describe(got[0][i]) << "qemu-nbd\n"
                                      << describe(got[1][i]);
    }
    if (maps) *maps = got[0];
  }

  TempDir dir_{"nbd-contexts"};
  SocketDir socket_dir_;
  std::unique_ptr<ServeProcess> server_;
};

// qemu:allocation-depth over a chain of three images of different sizes:
// data and zeros in each layer, overlapping, and ranges past the end of the
// shorter backing files. base:allocation from the same server must still
// be qemu-nbd's too.
TEST_F(NbdContextsTest, AllocationDepthThroughAChainEqualsQemuNbd) {
  ImageBuilder b(dir_.path());
  b.create("base.qcow2", "qcow2", "cluster_size=65536", 32 * M);
  b.write("base.qcow2", "qcow2", {P(0, 1 * M, 0x11), P(20 * M, 64 * K, 0x12), P(30 * M, 2 * M, 0x13)});
  b.create("mid.qcow2", "qcow2", "cluster_size=65536", 48 * M, "base.qcow2", "qcow2");
  b.write("mid.qcow2", "qcow2", {P(512 * K, 1 * M, 0x21), Z(20 * M, 64 * K), P(40 * M, 128 * K, 0x22)});
  b.create("top.qcow2", "qcow2", "cluster_size=65536", 64 * M, "mid.qcow2", "qcow2");
  b.write("top.qcow2", "qcow2", {P(2 * M, 64 * K, 0x31), Z(4 * M, 64 * K), ZU(31 * M, 64 * K),
                                 P(40 * M + 64 * K, 64 * K, 0x32), P(50 * M, 4 * K, 0x33)});
  ASSERT_TRUE(b.ok()) << b.error() << "\n" << b.script();

  std::vector<Extents> maps;
  ASSERT_NO_FATAL_FAILURE(expect_same_as_qemu_nbd({"-A"}, dir_.file("top.qcow2"),
                                                  {"qemu:allocation-depth", "base:allocation"}, &maps));
  // Not a trivial map: every depth of the chain shows up.
  std::vector<bool> seen(4);
  for (auto [start, length, depth] : maps.at(0)) {
    if (depth < seen.size()) seen[depth] = true;
  }
  EXPECT_EQ(seen, std::vector<bool>(4, true)) << describe(maps.at(0)) << b.script();
}

// Both contexts on one server: nbdinfo lists them, and --map of each gives
// that context's map (base:allocation's flags, the depths).
TEST_F(NbdContextsTest, SeveralContextsOnOneServer) {
  ImageBuilder b(dir_.path());
  b.create("base.qcow2", "qcow2", "cluster_size=65536", 8 * M);
  b.write("base.qcow2", "qcow2", {P(1 * M, 1 * M, 0x11)});
  b.create("top.qcow2", "qcow2", "cluster_size=65536", 8 * M, "base.qcow2", "qcow2");
  b.write("top.qcow2", "qcow2", {P(4 * M, 1 * M, 0x22)});
  ASSERT_TRUE(b.ok()) << b.error() << "\n" << b.script();
  ASSERT_TRUE(serve(false, {"-A", "-r"}, dir_.file("top.qcow2")));
  EXPECT_EQ(listed_contexts(socket_dir_.uri()), (std::vector<std::string>{"base:allocation", "qemu:allocation-depth"}));
  Extents base, depth;
  ASSERT_TRUE(map("base:allocation", &base));
  ASSERT_TRUE(map("qemu:allocation-depth", &depth));
  EXPECT_EQ(base, (Extents{{0, 1 * M, 3}, {1 * M, 1 * M, 0}, {2 * M, 2 * M, 3}, {4 * M, 1 * M, 0}, {5 * M, 3 * M, 3}}))
      << describe(base);
  EXPECT_EQ(depth, (Extents{{0, 1 * M, 0}, {1 * M, 1 * M, 2}, {2 * M, 2 * M, 0}, {4 * M, 1 * M, 1}, {5 * M, 3 * M, 0}}))
      << describe(depth);
  ASSERT_NO_FATAL_FAILURE(stop());
}

// The image of the bitmap tests: bitmap b0 added first, b1 (coarser) after
// some writes, then more writes, all by qemu-io.
void build_bitmap_image(ImageBuilder& b) {
  b.create("a.qcow2", "qcow2", "cluster_size=65536", 64 * M);
  b.run({"qemu-img", "bitmap", "--add", "a.qcow2", "b0"});
  b.write("a.qcow2", "qcow2", {P(1 * M, 128 * K, 0x11), P(10 * M + 4 * K, 4 * K, 0x12), Z(20 * M, 1 * M)});
  b.run({"qemu-img", "bitmap", "--add", "-g", "128K", "a.qcow2", "b1"});
  b.write("a.qcow2", "qcow2", {P(30 * M + 100 * K, 64 * K, 0x13), D(1 * M, 64 * K)});
}

// qemu:dirty-bitmap:NAME of qemu-img's bitmaps, read-only: the listing and
// each bitmap's map are qemu-nbd's.
TEST_F(NbdContextsTest, DirtyBitmapsEqualQemuNbd) {
  ImageBuilder b(dir_.path());
  build_bitmap_image(b);
  ASSERT_TRUE(b.ok()) << b.error() << "\n" << b.script();
  std::vector<Extents> maps;
  ASSERT_NO_FATAL_FAILURE(expect_same_as_qemu_nbd({"-A", "-B", "b0", "-B", "b1"}, dir_.file("a.qcow2"),
                                                  {"qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"}, &maps));
  // The writes' ranges, granule-aligned: not a trivial map either.
  EXPECT_EQ(maps.at(0), (Extents{{0, 1 * M, 0},
                                 {1 * M, 128 * K, 1},
                                 {1 * M + 128 * K, 9 * M - 128 * K, 0},
                                 {10 * M, 64 * K, 1},
                                 {10 * M + 64 * K, 10 * M - 64 * K, 0},
                                 {20 * M, 1 * M, 1},
                                 {21 * M, 9 * M + 64 * K, 0},
                                 {30 * M + 64 * K, 128 * K, 1},
                                 {30 * M + 192 * K, 34 * M - 192 * K, 0}}))
      << describe(maps.at(0));
}

// -B finds a bitmap down the backing chain, as qemu-nbd does; past the end
// of the shorter backing file it reads as clean.
TEST_F(NbdContextsTest, BitmapOfABackingFileEqualsQemuNbd) {
  ImageBuilder b(dir_.path());
  b.create("base.qcow2", "qcow2", "cluster_size=65536", 16 * M);
  b.run({"qemu-img", "bitmap", "--add", "base.qcow2", "bb"});
  b.write("base.qcow2", "qcow2", {P(1 * M, 64 * K, 0x11), P(15 * M, 1 * M, 0x12)});
  b.create("top.qcow2", "qcow2", "cluster_size=65536", 32 * M, "base.qcow2", "qcow2");
  b.write("top.qcow2", "qcow2", {P(2 * M, 64 * K, 0x21)});
  ASSERT_TRUE(b.ok()) << b.error() << "\n" << b.script();
  std::vector<Extents> maps;
  ASSERT_NO_FATAL_FAILURE(
      expect_same_as_qemu_nbd({"-B", "bb"}, dir_.file("top.qcow2"), {"qemu:dirty-bitmap:bb"}, &maps));
  EXPECT_EQ(maps.at(0), (Extents{{0, 1 * M, 0}, {1 * M, 64 * K, 1}, {1 * M + 64 * K, 14 * M - 64 * K, 0},
                                 {15 * M, 1 * M, 1}, {16 * M, 16 * M, 0}}))
      << describe(maps.at(0));
}

// Writes through `uqcow serve -B` mark the bitmap, and the map grows by the
// written granules; after the server closed the image, qemu-nbd reads the
// same bitmap from it.
TEST_F(NbdContextsTest, WritesThroughServeMarkTheBitmap) {
  ImageBuilder b(dir_.path());
  build_bitmap_image(b);
  ASSERT_TRUE(b.ok()) << b.error() << "\n" << b.script();
  const std::string image = dir_.file("a.qcow2");
  Extents before, after, persisted;
  ASSERT_TRUE(serve(false, {"-B", "b0"}, image));
  ASSERT_TRUE(map("qemu:dirty-bitmap:b0", &before));
  auto w = run_command({"qemu-io", "-f", "raw", "-c", "write -P 0x44 40M 4k", "-c", "write -z 50M 128k", "-c",
                        "write -P 0x45 " + std::to_string(1 * M + 128 * K) + " 64k", socket_dir_.uri()});
  ASSERT_TRUE(Succeeded(w));
  ASSERT_TRUE(map("qemu:dirty-bitmap:b0", &after));
  ASSERT_NO_FATAL_FAILURE(stop());

  // The expected map: `before`'s dirty ranges plus the written granules
  // (64 KiB), merged.
  std::vector<bool> granules(64 * M / (64 * K));
  for (auto [start, length, dirty] : before) {
    for (uint64_t g = start / (64 * K); dirty && g < (start + length) / (64 * K); ++g) granules[g] = true;
  }
  for (uint64_t offset : {40 * M, 50 * M, 50 * M + 64 * K, 1 * M + 128 * K}) granules[offset / (64 * K)] = true;
  Extents want;
  for (size_t g = 0; g < granules.size(); ++g) {
    const unsigned v = granules[g];
    if (!want.empty() && std::get<2>(want.back()) == v) {
      std::get<1>(want.back()) += 64 * K;
    } else {
      want.emplace_back(g * 64 * K, 64 * K, v);
    }
  }
  EXPECT_EQ(after, want) << "before the writes\n" << describe(before) << "after\n" << describe(after);
  ASSERT_TRUE(serve(true, {"-r", "-B", "b0"}, image));
  ASSERT_TRUE(map("qemu:dirty-bitmap:b0", &persisted));
  EXPECT_EQ(persisted, want) << "qemu-nbd after uqcow serve closed the image\n" << describe(persisted);
  ASSERT_NO_FATAL_FAILURE(stop());
}

// A bitmap that does not exist, or that a crash left in use, stops both
// servers before they listen, with the same message and exit status.
TEST_F(NbdContextsTest, MissingOrInconsistentBitmapFailsAsQemuNbd) {
  ImageBuilder b(dir_.path());
  b.create("a.qcow2", "qcow2", "cluster_size=65536", 64 * M);
  b.run({"qemu-img", "bitmap", "--add", "a.qcow2", "crashed"});
  // qemu-io sets IN_USE at a read-write open; abort leaves it set.
  b.write("a.qcow2", "qcow2", {P(0, 64 * K, 0x11)}, {"abort"}, /*expect_failure=*/true);
  ASSERT_TRUE(b.ok()) << b.error() << "\n" << b.script();
  const std::string image = dir_.file("a.qcow2");
  for (const std::string name : {"missing", "crashed"}) {
    auto qemu = run_command({"qemu-nbd", "-t", "-f", "qcow2", "-k", socket_dir_.socket(), "-B", name, image});
    auto ours = run_uqcow({"serve", "--socket", socket_dir_.socket(), "-B", name, image});
    EXPECT_EQ(qemu.exit_code, 1) << qemu.describe();
    EXPECT_EQ(ours.exit_code, qemu.exit_code) << ours.describe();
    const std::string prefix = "qemu-nbd: ";
    ASSERT_EQ(qemu.err.rfind(prefix, 0), 0u) << qemu.err;
    EXPECT_NE(ours.err.find(qemu.err.substr(prefix.size())), std::string::npos)
        << "uqcow: " << ours.err << "qemu-nbd: " << qemu.err;
  }
}

}  // namespace
}  // namespace uqcow::testing
