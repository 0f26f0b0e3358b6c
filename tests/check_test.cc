// `uqcow check` against `qemu-img check`, the oracle.
//
// - CleanImages: images made by qemu-img/qemu-io (cluster sizes, refcount
//   widths, compat 0.10, compression, snapshots, extended L2, backing chains,
//   external data files, bitmaps, preallocation, LUKS) must check clean with
//   both tools, which print byte-identical human and JSON reports; -r all
//   must leave such an image untouched.
// - DamagedImages: the same kind of images with bytes patched (leaks, low
//   refcounts, wrong COPIED flags, entries beyond the end of the file or
//   misaligned, broken refcount tables, a lazy-refcounts image left dirty...):
//   both tools must agree on the verdict; then `uqcow check -r leaks|all`
//   repairs a copy, `qemu-img check` judges the result, and the guest content
//   (qemu-img convert -O raw) must be what it was. `qemu-img check -r` on
//   another copy is the second opinion. Where uqcow repairs more than QEMU
//   7.2, the case says so and why.
// - The library entry point reports I/O errors instead of half-repairing.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <ostream>
#include <regex>
#include <string>
#include <utility>
#include <vector>

#include "engine/sync_wait.h"
#include "qcow2/check.h"
#include "tests/testutil.h"
#include "uring/raw_file.h"
#include "uring/reactor.h"

namespace uqcow::testing {
namespace {

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1024 * KiB;
constexpr uint64_t kCopied = 1ull << 63;
constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ull;
constexpr const char* kImage = "img.qcow2";  // relative: both tools print the same filename

// ---- Building images --------------------------------------------------------

// An image built by commands run in the test directory; "@" stands for the
// image file name. A step starting with "-" may fail (qemu-io ... abort); one
// starting with "~" is tried up to three times (LUKS creation times a PBKDF
// and sometimes fails with "Unable to get accurate CPU usage").
struct Recipe {
  std::string name;
  std::vector<std::vector<std::string>> steps;
  // When set, qemu-img check gets these arguments instead of the file name
  // (LUKS: qemu-img needs the key to open the image; uqcow check reads only
  // metadata and needs none).
  std::vector<std::string> qemu_image_args = {};
};

void PrintTo(const Recipe& r, std::ostream* os) { *os << r.name; }

std::vector<std::string> create(std::vector<std::string> options, const std::string& size = "64M") {
  std::vector<std::string> argv{"qemu-img", "create", "-q", "-f", "qcow2"};
  for (auto& o : options) argv.insert(argv.end(), {"-o", o});
  argv.insert(argv.end(), {"@", size});
  return argv;
}

std::vector<std::string> io(std::vector<std::string> commands) {
  std::vector<std::string> argv{"qemu-io"};
  for (auto& c : commands) argv.insert(argv.end(), {"-c", c});
  argv.push_back("@");
  return argv;
}

std::vector<std::string> crashing(std::vector<std::string> argv) {
  argv.insert(argv.begin(), "-");
  return argv;
}

std::vector<std::string> snapshot(const std::string& name) {
  return {"qemu-img", "snapshot", "-c", name, "@"};
}

// Runs the recipe in `dir`; returns the commands as a reproducer on failure.
::testing::AssertionResult build(const Recipe& r, const TempDir& dir) {
  for (auto argv : r.steps) {
    bool may_fail = !argv.empty() && argv[0] == "-";
    int attempts = !argv.empty() && argv[0] == "~" ? 3 : 1;
    if (may_fail || attempts > 1) argv.erase(argv.begin());
    for (auto& a : argv) {
      if (a == "@") a = kImage;
    }
    CommandResult c = run_command(argv, dir.path());
    while (!c.ok() && --attempts > 0) c = run_command(argv, dir.path());
    if (!c.ok() && !may_fail) return ::testing::AssertionFailure() << "building " << r.name << ":\n" << c.describe();
  }
  return ::testing::AssertionSuccess();
}

// ---- Running both tools -----------------------------------------------------

CommandResult qemu_check(const std::string& dir, const std::string& file, std::vector<std::string> args,
                         const std::vector<std::string>& image_args = {}) {
  std::vector<std::string> argv{"qemu-img", "check"};
  argv.insert(argv.end(), args.begin(), args.end());
  if (image_args.empty()) {
    argv.push_back(file);
  } else {
    argv.insert(argv.end(), image_args.begin(), image_args.end());
  }
  return run_command(argv, dir);
}

CommandResult uqcow_check(const std::string& dir, const std::string& file, std::vector<std::string> args) {
  std::vector<std::string> argv{"check"};
  argv.insert(argv.end(), args.begin(), args.end());
  argv.push_back(file);
  return run_uqcow(argv, dir);
}

// The numbers of a --output=json report.
std::map<std::string, uint64_t> json_numbers(const std::string& json) {
  std::map<std::string, uint64_t> out;
  static const std::regex field("\"([a-z-]+)\": ([0-9]+)");
  for (std::sregex_iterator it(json.begin(), json.end(), field), end; it != end; ++it) {
    out[(*it)[1]] = std::stoull((*it)[2]);
  }
  return out;
}

::testing::AssertionResult SameReport(const CommandResult& qemu, const CommandResult& uqcow) {
  if (qemu.exit_code == uqcow.exit_code && qemu.out == uqcow.out) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "qemu-img and uqcow disagree\n--- qemu-img:\n"
                                       << qemu.describe() << "\n--- uqcow:\n" << uqcow.describe();
}

// The guest content as qemu-img reads it, or nullopt (with a gtest failure
// message in `why`) when it cannot be read.
std::optional<std::vector<uint8_t>> guest_content(const std::string& dir, const std::string& file,
                                                  std::string* why = nullptr) {
  std::string raw = file + ".raw";
  CommandResult c = run_command({"qemu-img", "convert", "-O", "raw", file, raw}, dir);
  if (!c.ok()) {
    if (why) *why = c.describe();
    return std::nullopt;
  }
  auto data = read_file(dir + "/" + raw);
  ::unlink((dir + "/" + raw).c_str());
  return data;
}

bool copy_file(const std::string& from, const std::string& to) {
  auto data = read_file(from);
  return data && write_file(to, *data);
}

// ---- The image's layout, read with plain file I/O (an oracle independent of
// the library) to find the bytes to damage.

struct Layout {
  std::string path;
  uint32_t cluster_bits = 0;
  uint32_t refcount_order = 4;
  uint64_t l1_offset = 0;
  uint64_t reftable_offset = 0;
  bool extended_l2 = false;
  uint64_t file_size = 0;

  static Layout read(const std::string& path) {
    Layout l;
    l.path = path;
    l.cluster_bits = *peek_be32(path, 20);
    l.l1_offset = *peek_be64(path, 40);
    l.reftable_offset = *peek_be64(path, 48);
    if (*peek_be32(path, 4) >= 3) {
      l.refcount_order = *peek_be32(path, 96);
      l.extended_l2 = *peek_be64(path, 72) & (1u << 4);
    }
    struct stat st {};
    ::stat(path.c_str(), &st);
    l.file_size = static_cast<uint64_t>(st.st_size);
    return l;
  }
  uint64_t cluster_size() const { return 1ull << cluster_bits; }
  uint64_t entry_size() const { return extended_l2 ? 16 : 8; }
  uint64_t l2_bits() const { return cluster_bits - (extended_l2 ? 4 : 3); }
  uint64_t l1_entry_offset(uint64_t guest) const { return l1_offset + (guest >> (cluster_bits + l2_bits())) * 8; }
  // Where the L2 entry (and, with extended L2, its bitmap 8 bytes further)
  // for guest offset `guest` lives.
  uint64_t l2_entry_offset(uint64_t guest) const {
    uint64_t l2 = *peek_be64(path, l1_entry_offset(guest)) & kOffsetMask;
    return l2 + ((guest >> cluster_bits) & ((1ull << l2_bits()) - 1)) * entry_size();
  }
  uint64_t l2_entry(uint64_t guest) const { return *peek_be64(path, l2_entry_offset(guest)); }
  uint64_t host_cluster(uint64_t guest) const { return (l2_entry(guest) & kOffsetMask) >> cluster_bits; }

  // Refcounts at any width: below 8 bits packed LSB-first in each byte,
  // 16/32/64 bits big-endian.
  uint32_t refcount_bits() const { return 1u << refcount_order; }
  uint64_t refcount_byte(uint64_t cluster) const {
    uint64_t per_block = (cluster_size() * 8) >> refcount_order;
    uint64_t block = *peek_be64(path, reftable_offset + (cluster / per_block) * 8) & kOffsetMask;
    return block + (cluster % per_block) * refcount_bits() / 8;
  }
  uint64_t refcount(uint64_t cluster) const {
    uint64_t at = refcount_byte(cluster);
    uint32_t bits = refcount_bits();
    if (bits >= 8) {
      uint64_t v = 0;
      for (uint32_t i = 0; i < bits / 8; ++i) v = v << 8 | byte_at(at + i);
      return v;
    }
    uint32_t shift = static_cast<uint32_t>(cluster % (8 / bits)) * bits;
    return (byte_at(at) >> shift) & ((1u << bits) - 1);
  }
  void set_refcount(uint64_t cluster, uint64_t value) const {
    uint64_t at = refcount_byte(cluster);
    uint32_t bits = refcount_bits();
    std::vector<uint8_t> bytes;
    if (bits >= 8) {
      for (uint32_t i = bits / 8; i-- > 0;) bytes.push_back(static_cast<uint8_t>(value >> (8 * i)));
    } else {
      uint32_t shift = static_cast<uint32_t>(cluster % (8 / bits)) * bits;
      uint8_t mask = static_cast<uint8_t>(((1u << bits) - 1) << shift);
      bytes.push_back(static_cast<uint8_t>((byte_at(at) & ~mask) | ((value << shift) & mask)));
    }
    patch_file(path, at, bytes);
  }
  // The first cluster inside the file that no refcount claims.
  std::optional<uint64_t> free_cluster() const {
    for (uint64_t c = 1; c < file_size >> cluster_bits; ++c) {
      if (refcount(c) == 0) return c;
    }
    return std::nullopt;
  }
  uint8_t byte_at(uint64_t offset) const {
    uint8_t b = 0;
    int fd = ::open(path.c_str(), O_RDONLY);
    if (fd >= 0) {
      if (::pread(fd, &b, 1, static_cast<off_t>(offset)) != 1) b = 0;
      ::close(fd);
    }
    return b;
  }
};

// ---- Images -------------------------------------------------------------------

// 64 MiB, 64 KiB clusters: data at 0 (1 MiB) and 10 MiB, a preallocated zero
// cluster at 30 MiB, and freed clusters inside the file (discard at 40 MiB).
Recipe plain(std::vector<std::string> options = {}) {
  return {"plain",
          {create(options),
           io({"write -P 1 0 1M", "write -P 2 10M 256k", "write -P 3 30M 64k", "write -z 30M 64k",
               "write -P 4 40M 1M", "discard 40M 512k"})}};
}

// Clusters shared between the active L1 and a snapshot (refcount 2).
Recipe with_snapshot(std::vector<std::string> options = {}) {
  return {"snapshot",
          {create(options), io({"write -P 1 0 2M"}), snapshot("s1"), io({"write -P 5 0 64k"})}};
}

std::vector<Recipe> clean_recipes() {
  std::vector<Recipe> r;
  for (const char* cs : {"512", "4096", "65536", "2M"}) {
    r.push_back({std::string("cluster_size_") + cs,
                 {create({std::string("cluster_size=") + cs}),
                  io({"write -P 1 0 3M", "write -P 2 20M 100k", "write -z 1M 64k", "discard 2M 512k"})}});
  }
  for (const char* bits : {"1", "2", "4", "8", "16", "32", "64"}) {
    r.push_back({std::string("refcount_bits_") + bits,
                 {create({std::string("refcount_bits=") + bits, "cluster_size=4096"}),
                  io({"write -P 1 0 2M", "write -P 2 7M 100k", "discard 1M 256k"})}});
  }
  for (const char* bits : {"2", "8", "64"}) {
    r.push_back({std::string("snapshots_refcount_bits_") + bits,
                 {create({std::string("refcount_bits=") + bits}), io({"write -P 1 0 2M"}), snapshot("s1"),
                  io({"write -P 3 1M 2M"}), snapshot("s2"), io({"write -P 4 512k 64k"})}});
  }
  r.push_back({"compat_0_10_snapshot",
               {create({"compat=0.10"}), io({"write -P 1 0 1M"}), snapshot("s"), io({"write -P 2 0 64k"})}});
  r.push_back({"extended_l2",
               {create({"extended_l2=on"}),
                io({"write -P 1 0 4k", "write -P 1 100k 8k", "write -z 200k 4k", "write -z 1M 64k",
                    "write -P 2 2M 1M"})}});
  r.push_back({"extended_l2_16k_snapshot",
               {create({"extended_l2=on", "cluster_size=16k"}),
                io({"write -P 1 0 4k", "write -P 1 100k 8k", "write -z -u 200k 1k"}), snapshot("s"),
                io({"write -P 5 0 1k"})}});
  r.push_back({"compressed_zlib",
               {{"qemu-img", "create", "-q", "-f", "raw", "src.raw", "8M"},
                {"qemu-io", "-f", "raw", "-c", "write -P 7 0 1M", "-c", "write -P 9 3M 512k", "src.raw"},
                {"qemu-img", "convert", "-c", "-O", "qcow2", "src.raw", "@"},
                io({"write -P 3 6M 64k", "write -P 4 1M 64k"})}});
  r.push_back({"compressed_zstd_512",
               {{"qemu-img", "create", "-q", "-f", "raw", "src.raw", "4M"},
                {"qemu-io", "-f", "raw", "-c", "write -P 7 0 1M", "src.raw"},
                {"qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd,cluster_size=512",
                 "src.raw", "@"}}});
  r.push_back({"backing_chain",
               {{"qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "32M"},
                {"qemu-io", "-c", "write -P 9 0 32M", "base.qcow2"},
                {"qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "@"},
                io({"write -P 1 1M 100k", "write -z 5M 64k"})}});
  r.push_back({"data_file",
               {create({"data_file=img.data"}), io({"write -P 1 0 1M", "write -P 2 10M 64k"})}});
  r.push_back({"data_file_raw", {create({"data_file=img.data", "data_file_raw=on"}), io({"write -P 1 0 1M"})}});
  r.push_back({"lazy_refcounts_clean", {create({"lazy_refcounts=on"}), io({"write -P 1 0 1M"})}});
  r.push_back({"preallocation_metadata", {create({"preallocation=metadata"}), io({"write -z 1M 64k"})}});
  r.push_back({"preallocation_falloc", {create({"preallocation=falloc"}, "16M")}});
  r.push_back({"bitmaps",
               {create({}), {"qemu-img", "bitmap", "--add", "@", "b0"},
                {"qemu-img", "bitmap", "--add", "-g", "512k", "@", "b1"},
                io({"write 0 4M", "write 20M 64k"})}});
  r.push_back({"empty", {create({})}});
  r.push_back({"sparse_4t", {create({}, "4T"), io({"write -P 1 0 64k", "write -P 2 3T 64k"})}});
  const std::string secret = "secret,id=sec0,data=abc";
  const std::string opts = "driver=qcow2,file.filename=img.qcow2,encrypt.key-secret=sec0";
  r.push_back({"luks",
               {{"~", "qemu-img", "create", "-q", "-f", "qcow2", "--object", secret, "-o",
                 "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", "@", "16M"},
                {"qemu-io", "--object", secret, "--image-opts", opts, "-c", "write -P 1 0 1M"}},
               {"--object", secret, "--image-opts", opts}});
  return r;
}

class CleanImages : public ::testing::TestWithParam<Recipe> {};

TEST_P(CleanImages, BothToolsReportTheSame) {
  UQ_REQUIRE_TOOL("qemu-img");
  UQ_REQUIRE_TOOL("qemu-io");
  const Recipe& r = GetParam();
  TempDir dir("check");
  ASSERT_TRUE(build(r, dir));
  for (const char* output : {"--output=human", "--output=json"}) {
    CommandResult q = qemu_check(dir.path(), kImage, {output}, r.qemu_image_args);
    CommandResult u = uqcow_check(dir.path(), kImage, {output});
    ASSERT_EQ(q.exit_code, 0) << q.describe();
    if (r.qemu_image_args.empty() || std::string(output) == "--output=human") {
      EXPECT_TRUE(SameReport(q, u));
    } else {
      // The filename field differs (--image-opts); the numbers must not.
      EXPECT_EQ(u.exit_code, 0) << u.describe();
      EXPECT_EQ(json_numbers(q.out), json_numbers(u.out)) << q.describe() << u.describe();
    }
  }
  // Nothing to repair: -r all changes no byte.
  auto before = read_file(dir.file(kImage));
  CommandResult u = uqcow_check(dir.path(), kImage, {"-r", "all"});
  EXPECT_EQ(u.exit_code, 0) << u.describe();
  EXPECT_TRUE(read_file(dir.file(kImage)) == before) << "uqcow check -r all modified a clean image";
}

INSTANTIATE_TEST_SUITE_P(Check, CleanImages, ::testing::ValuesIn(clean_recipes()),
                         [](const auto& info) { return info.param.name; });

TEST(CheckCli, RawImagesHaveNoChecks) {
  UQ_REQUIRE_TOOL("qemu-img");
  TempDir dir("check");
  ASSERT_TRUE(Succeeded(run_command({"qemu-img", "create", "-q", "-f", "raw", "img.raw", "1M"}, dir.path())));
  for (std::vector<std::string> args : {std::vector<std::string>{}, {"-f", "raw"}}) {
    CommandResult q = qemu_check(dir.path(), "img.raw", args);
    CommandResult u = uqcow_check(dir.path(), "img.raw", args);
    EXPECT_EQ(q.exit_code, 63) << q.describe();
    EXPECT_EQ(u.exit_code, 63) << u.describe();
    EXPECT_TRUE(contains_icase(u.err, "does not support checks")) << u.describe();
  }
}

TEST(CheckCli, RejectsBadArguments) {
  TempDir dir("check");
  EXPECT_EQ(uqcow_check(dir.path(), "x", {"-r", "some"}).exit_code, 1);
  EXPECT_EQ(uqcow_check(dir.path(), "x", {"--output=xml"}).exit_code, 1);
  CommandResult missing = uqcow_check(dir.path(), "missing.qcow2", {});
  EXPECT_EQ(missing.exit_code, 1) << missing.describe();
  EXPECT_TRUE(contains_icase(missing.err, "missing.qcow2")) << missing.describe();
}

// ---- Damaged images ---------------------------------------------------------

// What one tool does with -r leaks or -r all on a damaged copy.
struct Repair {
  int qemu_exit;
  int uqcow_exit;
  bool same_output;  // byte-identical reports (same fixes, same layout)
};

// The guest content a repaired image must have.
enum class Content {
  kOriginal,    // what the image held before the damage
  kDamaged,     // what the damaged image reads (the damage lost data QEMU reads as zeros)
  kNotCompared, // the damage destroyed or hid guest data: not compared
};

struct DamageCase {
  std::string name;
  Recipe recipe;
  // Patches the image; returns a failure if the layout is not as expected.
  std::function<::testing::AssertionResult(const Layout&)> damage;
  int check_exit;         // both tools, no repair
  Repair leaks;
  Repair all;
  int after_all_exit;     // qemu-img check on uqcow's -r all result
  Content content;
  std::string why = {};   // where uqcow and QEMU 7.2 differ, and why
};

void PrintTo(const DamageCase& c, std::ostream* os) { *os << c.name; }

::testing::AssertionResult patch64(const Layout& l, uint64_t offset, uint64_t value) {
  if (!patch_be64(l.path, offset, value)) return ::testing::AssertionFailure() << "cannot patch " << l.path;
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult add_refcount(const Layout& l, uint64_t cluster, int64_t delta) {
  uint64_t r = l.refcount(cluster);
  if (delta < 0 && r == 0) return ::testing::AssertionFailure() << "cluster " << cluster << " is free";
  l.set_refcount(cluster, r + static_cast<uint64_t>(delta));
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult leak_free_cluster(const Layout& l) {
  auto c = l.free_cluster();
  if (!c) return ::testing::AssertionFailure() << "no free cluster inside " << l.path;
  l.set_refcount(*c, 1);
  return ::testing::AssertionSuccess();
}

// The cluster after the end of the file, 100 clusters on.
uint64_t beyond_eof(const Layout& l) {
  return ((l.file_size >> l.cluster_bits) + 100) << l.cluster_bits;
}

constexpr Repair kSame0{0, 0, true};
constexpr Repair kSame1{1, 1, true};
constexpr Repair kSame2{2, 2, true};

// Refcounts that are too high or too low.
void add_refcount_cases(std::vector<DamageCase>& c) {
  c.push_back({"leak_of_data_cluster", plain(),
               [](const Layout& l) { return add_refcount(l, l.host_cluster(0), 1); },
               2, kSame0, kSame0, 0, Content::kOriginal});
  c.push_back({"leak_of_free_cluster", plain(), leak_free_cluster, 3, kSame0, kSame0, 0, Content::kOriginal});
  for (const char* bits : {"1", "4", "64"}) {
    c.push_back({std::string("leak_refcount_bits_") + bits, plain({std::string("refcount_bits=") + bits}),
                 leak_free_cluster, 3, kSame0, kSame0, 0, Content::kOriginal});
  }
  c.push_back({"refcount_too_low_shared", with_snapshot(),
               [](const Layout& l) { return add_refcount(l, l.host_cluster(1 * MiB), -1); },
               2, kSame2, kSame0, 0, Content::kOriginal});
  // A refcount of 0 for a referenced cluster can only be fixed by a rebuild.
  // QEMU reuses free clusters inside the file for the new structure; uqcow
  // appends it, so the end offset differs where the file has holes.
  for (std::string options : {"refcount_bits=16", "refcount_bits=1", "refcount_bits=64", "cluster_size=512"}) {
    std::string name = "refcount_zero_" + options;
    name[name.find('=')] = '_';
    c.push_back({name, plain({options}), [](const Layout& l) { return add_refcount(l, l.host_cluster(0), -1); },
                 2, kSame1, {0, 0, false}, 0, Content::kOriginal, "rebuild: appended, not in holes"});
  }
}

// Bad L1/L2 entries.
void add_entry_cases(std::vector<DamageCase>& c) {
  c.push_back({"copied_cleared_in_l2", plain(),
               [](const Layout& l) { return patch64(l, l.l2_entry_offset(0), l.l2_entry(0) & ~kCopied); },
               2, kSame0, kSame0, 0, Content::kOriginal});
  c.push_back({"copied_cleared_in_l1", plain(),
               [](const Layout& l) {
                 return patch64(l, l.l1_offset, *peek_be64(l.path, l.l1_offset) & ~kCopied);
               },
               2, kSame0, kSame0, 0, Content::kOriginal});
  c.push_back({"copied_set_on_shared_cluster", with_snapshot(),
               [](const Layout& l) { return patch64(l, l.l2_entry_offset(MiB), l.l2_entry(MiB) | kCopied); },
               2, kSame0, kSame0, 0, Content::kOriginal});
  c.push_back({"l2_entry_beyond_eof", plain(),
               [](const Layout& l) { return patch64(l, l.l2_entry_offset(64 * KiB), kCopied | beyond_eof(l)); },
               2, kSame2, {2, 0, false}, 0, Content::kDamaged,
               "QEMU 7.2 only reports it; uqcow -r all makes the entry read as zeros, which is what "
               "the cluster past the end of the file read as"});
  c.push_back({"l2_entry_absurd_offset", plain(),
               [](const Layout& l) {
                 return patch64(l, l.l2_entry_offset(64 * KiB), kCopied | 0x00ffffffffff0000ull);
               },
               2, kSame2, {2, 0, false}, 0, Content::kDamaged, "as l2_entry_beyond_eof"});
  c.push_back({"misaligned_preallocated_zero_cluster", plain(),
               [](const Layout& l) {
                 return patch64(l, l.l2_entry_offset(30 * MiB), l.l2_entry(30 * MiB) + 0x400);
               },
               2, kSame1, kSame0, 0, Content::kOriginal});
  // Neither tool touches a misaligned entry that holds data: it may still be
  // recovered by hand.
  c.push_back({"misaligned_data_cluster", plain(),
               [](const Layout& l) { return patch64(l, l.l2_entry_offset(64 * KiB), l.l2_entry(64 * KiB) + 0x200); },
               2, kSame2, kSame2, 2, Content::kNotCompared});
  c.push_back({"reserved_bits_in_l1_and_l2", plain(),
               [](const Layout& l) {
                 auto a = patch64(l, l.l2_entry_offset(0), l.l2_entry(0) | 0x2);
                 return a ? patch64(l, l.l1_offset, *peek_be64(l.path, l.l1_offset) | (1ull << 56)) : a;
               },
               2, kSame2, kSame2, 2, Content::kOriginal});
  c.push_back({"extended_l2_bad_bitmap",
               {"extended_l2", {create({"extended_l2=on"}), io({"write -P 1 0 4k", "write -P 2 1M 64k"})}},
               [](const Layout& l) {
                 uint64_t at = l.l2_entry_offset(0) + 8;
                 return patch64(l, at, *peek_be64(l.path, at) | (1ull << 32));
               },
               2, kSame2, kSame2, 2, Content::kNotCompared});
  c.push_back({"compressed_cluster_with_copied",
               {"compressed",
                {{"qemu-img", "create", "-q", "-f", "raw", "src.raw", "4M"},
                 {"qemu-io", "-f", "raw", "-c", "write -P 7 0 1M", "src.raw"},
                 {"qemu-img", "convert", "-c", "-O", "qcow2", "src.raw", "@"}}},
               [](const Layout& l) { return patch64(l, l.l2_entry_offset(64 * KiB), l.l2_entry(64 * KiB) | kCopied); },
               2, kSame2, kSame2, 2, Content::kOriginal});
}

// A broken refcount structure, and the header bits.
void add_structure_cases(std::vector<DamageCase>& c) {
  c.push_back({"reftable_entry_to_l2_table", plain(),
               [](const Layout& l) {
                 return patch64(l, l.reftable_offset, *peek_be64(l.path, l.l1_offset) & kOffsetMask);
               },
               2, kSame1, {0, 0, false}, 0, Content::kOriginal, "rebuild: appended, not in holes"});
  c.push_back({"reftable_entry_beyond_eof", plain(),
               [](const Layout& l) { return patch64(l, l.reftable_offset, beyond_eof(l)); },
               2, kSame1, {0, 0, false}, 0, Content::kOriginal,
               "QEMU first grows the file to the bogus block (one more corruption fixed); uqcow never "
               "extends the file to an offset read from the image and rebuilds directly"});
  c.push_back({"reftable_entry_unaligned", plain(),
               [](const Layout& l) { return patch64(l, l.reftable_offset, *peek_be64(l.path, l.reftable_offset) + 0x200); },
               1, kSame1, {1, 0, false}, 0, Content::kOriginal,
               "QEMU marks the image corrupt while checking and then cannot write the rebuilt "
               "structure; uqcow rebuilds it"});
  c.push_back({"reftable_entry_reserved_bits", plain(),
               [](const Layout& l) { return patch64(l, l.reftable_offset, *peek_be64(l.path, l.reftable_offset) | 1); },
               2, kSame1, {1, 0, false}, 0, Content::kOriginal,
               "QEMU's rebuild reuses the old block's cluster, its own overlap check refuses that"});
  c.push_back({"reftable_entry_to_data_cluster", plain(),
               [](const Layout& l) { return patch64(l, l.reftable_offset + 8, l.l2_entry(0) & kOffsetMask); },
               2, kSame1, {0, 0, false}, 0, Content::kOriginal, "rebuild: appended, not in holes"});
  c.push_back({"data_cluster_inside_reftable", plain(),
               [](const Layout& l) { return patch64(l, l.l2_entry_offset(64 * KiB), kCopied | l.reftable_offset); },
               2, kSame2, {0, 0, false}, 0, Content::kNotCompared,
               "QEMU raises the refcount and leaves the table shared with guest data; uqcow moves the "
               "table away (rebuild)"});
  c.push_back({"lazy_refcounts_left_dirty",
               {"lazy",
                {create({"lazy_refcounts=on"}), crashing(io({"write -P 5 0 1M", "write -P 6 5M 64k", "abort"}))}},
               [](const Layout&) { return ::testing::AssertionSuccess(); },
               2, kSame1, kSame0, 0, Content::kOriginal});
  c.push_back({"corrupt_bit_set", plain(),
               [](const Layout& l) { return patch64(l, 72, *peek_be64(l.path, 72) | 2); },
               0, kSame0, kSame0, 0, Content::kOriginal});
}

std::vector<DamageCase> damage_cases() {
  std::vector<DamageCase> c;
  add_refcount_cases(c);
  add_entry_cases(c);
  add_structure_cases(c);
  return c;
}

uint64_t incompatible_bits(const std::string& path) { return peek_be64(path, 72).value_or(~0ull); }

class DamagedImages : public ::testing::TestWithParam<DamageCase> {};

// Runs -r `mode` with both tools on copies of the damaged image and checks
// what the case expects. Returns the path of uqcow's repaired copy.
std::string repair_and_compare(const TempDir& dir, const DamageCase& dc, const std::string& mode,
                               const Repair& expect) {
  const std::string q_copy = "qemu-" + mode + ".qcow2", u_copy = "uqcow-" + mode + ".qcow2";
  EXPECT_TRUE(copy_file(dir.file(kImage), dir.file(q_copy)));
  EXPECT_TRUE(copy_file(dir.file(kImage), dir.file(u_copy)));
  CommandResult q = qemu_check(dir.path(), q_copy, {"-r", mode});
  CommandResult u = uqcow_check(dir.path(), u_copy, {"-r", mode});
  EXPECT_EQ(q.exit_code, expect.qemu_exit) << "qemu-img -r " << mode << ":\n" << q.describe();
  EXPECT_EQ(u.exit_code, expect.uqcow_exit) << "uqcow -r " << mode << ":\n" << u.describe();
  if (expect.same_output) {
    EXPECT_TRUE(SameReport(q, u)) << "-r " << mode;
  }
  // The second opinion: where both repaired completely, the guest sees the same.
  if (q.exit_code == 0 && u.exit_code == 0 && dc.content != Content::kNotCompared) {
    CommandResult same = run_command({"qemu-img", "compare", q_copy, u_copy}, dir.path());
    EXPECT_EQ(same.exit_code, 0) << same.describe();
  }
  return u_copy;
}

TEST_P(DamagedImages, VerdictAndRepair) {
  UQ_REQUIRE_TOOL("qemu-img");
  UQ_REQUIRE_TOOL("qemu-io");
  const DamageCase& dc = GetParam();
  SCOPED_TRACE(dc.name + (dc.why.empty() ? "" : " (" + dc.why + ")"));
  TempDir dir("check");
  ASSERT_TRUE(build(dc.recipe, dir));
  auto original = guest_content(dir.path(), kImage);
  ASSERT_TRUE(original);
  ASSERT_TRUE(dc.damage(Layout::read(dir.file(kImage))));
  const auto damaged_bytes = read_file(dir.file(kImage));

  // The verdict, human and JSON.
  for (const char* output : {"--output=human", "--output=json"}) {
    CommandResult q = qemu_check(dir.path(), kImage, {output});
    CommandResult u = uqcow_check(dir.path(), kImage, {output});
    EXPECT_EQ(q.exit_code, dc.check_exit) << q.describe();
    EXPECT_TRUE(SameReport(q, u)) << output;
  }
  EXPECT_TRUE(read_file(dir.file(kImage)) == damaged_bytes) << "uqcow check without -r wrote to the image";

  std::optional<std::vector<uint8_t>> expected = original;
  if (dc.content == Content::kDamaged) {
    std::string why;
    expected = guest_content(dir.path(), kImage, &why);
    ASSERT_TRUE(expected) << why;
  }
  const uint64_t bits_before = incompatible_bits(dir.file(kImage));

  for (const std::string mode : {"leaks", "all"}) {
    const Repair& expect = mode == "leaks" ? dc.leaks : dc.all;
    std::string repaired = repair_and_compare(dir, dc, mode, expect);
    CommandResult judge = qemu_check(dir.path(), repaired, {});
    int expected_after = mode == "all" ? dc.after_all_exit : expect.uqcow_exit == 1 ? dc.check_exit : expect.uqcow_exit;
    EXPECT_EQ(judge.exit_code, expected_after) << "qemu-img check after uqcow -r " << mode << ":\n"
                                               << judge.describe();
    // Dirty and corrupt bits go when no corruption is left, and only then.
    uint64_t bits = incompatible_bits(dir.file(repaired));
    if (judge.exit_code == 0 || judge.exit_code == 3) {
      EXPECT_EQ(bits & 3, 0u) << "-r " << mode << " left the dirty/corrupt bits set";
    } else {
      EXPECT_EQ(bits & 3, bits_before & 3) << "-r " << mode << " changed the dirty/corrupt bits";
    }
    if (dc.content == Content::kNotCompared || expect.uqcow_exit == 1) continue;
    std::string why;
    auto content = guest_content(dir.path(), repaired, &why);
    ASSERT_TRUE(content) << "-r " << mode << ": " << why;
    EXPECT_TRUE(SameBytes(*content, *expected)) << "guest content changed by uqcow check -r " << mode;
  }
}

INSTANTIATE_TEST_SUITE_P(Check, DamagedImages, ::testing::ValuesIn(damage_cases()),
                         [](const auto& info) { return info.param.name; });

// Beyond QEMU, which never looks at the data file's length: a cluster mapped
// past the end of the external data file is reported, and -r all makes it
// read as zeros, which is what it read as.
TEST(CheckDataFile, ClustersPastTheEndOfTheDataFile) {
  UQ_REQUIRE_TOOL("qemu-img");
  UQ_REQUIRE_TOOL("qemu-io");
  TempDir dir("check");
  ASSERT_TRUE(build({"data_file", {create({"data_file=img.data"}), io({"write -P 1 0 1M", "write -P 2 10M 64k"})}},
                    dir));
  ASSERT_EQ(::truncate(dir.file("img.data").c_str(), 2 * MiB), 0);
  std::string why;
  auto before = guest_content(dir.path(), kImage, &why);
  ASSERT_TRUE(before) << why;

  EXPECT_EQ(qemu_check(dir.path(), kImage, {}).exit_code, 0);
  CommandResult u = uqcow_check(dir.path(), kImage, {"--output=json"});
  EXPECT_EQ(u.exit_code, 2) << u.describe();
  EXPECT_EQ(json_numbers(u.out)["corruptions"], 1u) << u.describe();
  EXPECT_TRUE(contains_icase(u.err, "beyond the end of the external data file")) << u.describe();

  u = uqcow_check(dir.path(), kImage, {"-r", "all", "--output=json"});
  EXPECT_EQ(u.exit_code, 0) << u.describe();
  EXPECT_EQ(json_numbers(u.out)["corruptions-fixed"], 1u) << u.describe();
  EXPECT_EQ(qemu_check(dir.path(), kImage, {}).exit_code, 0);
  EXPECT_EQ(uqcow_check(dir.path(), kImage, {}).exit_code, 0);
  auto after = guest_content(dir.path(), kImage, &why);
  ASSERT_TRUE(after) << why;
  EXPECT_TRUE(SameBytes(*after, *before));
}

// ---- The library entry point ----------------------------------------------

// Forwards to a RawFile; fails every write (or every read at or after
// `fail_reads_from`) with EIO.
class FailingDevice final : public BlockDevice {
 public:
  FailingDevice(std::unique_ptr<BlockDevice> inner, bool fail_writes, uint64_t fail_reads_from)
      : inner_(std::move(inner)), fail_writes_(fail_writes), fail_reads_from_(fail_reads_from) {}
  Task<Status> co_read(uint64_t offset, std::span<std::byte> buf) override {
    if (offset >= fail_reads_from_) co_return Error(EIO, "injected read error");
    co_return co_await inner_->co_read(offset, buf);
  }
  Task<Status> co_write(uint64_t offset, std::span<const std::byte> buf) override {
    if (fail_writes_) co_return Error(EIO, "injected write error");
    co_return co_await inner_->co_write(offset, buf);
  }
  Task<Status> co_readv(uint64_t offset, std::span<iovec> iov) override { return inner_->co_readv(offset, iov); }
  Task<Status> co_writev(uint64_t, std::span<iovec>) override {
    co_return Error(EIO, "injected write error");
  }
  Task<Status> co_flush() override { return inner_->co_flush(); }
  Task<Status> co_discard(uint64_t offset, uint64_t len) override { return inner_->co_discard(offset, len); }
  Task<Status> co_write_zeroes(uint64_t, uint64_t, bool) override {
    co_return Error(EIO, "injected write error");
  }
  Result<uint64_t> length() const override { return inner_->length(); }
  Result<uint64_t> allocated_bytes() const override { return inner_->allocated_bytes(); }
  Status truncate(uint64_t length) override { return inner_->truncate(length); }
  uint32_t alignment() const override { return inner_->alignment(); }
  bool read_only() const override { return inner_->read_only(); }
  const std::string& name() const override { return inner_->name(); }

 private:
  std::unique_ptr<BlockDevice> inner_;
  bool fail_writes_;
  uint64_t fail_reads_from_;
};

Result<qcow2::CheckResult> check_with(const std::string& path, bool fail_writes, uint64_t fail_reads_from,
                                     qcow2::RepairMode mode) {
  UQ_ASSIGN_OR_RETURN(auto reactor, uring::Reactor::create());
  UQ_ASSIGN_OR_RETURN(auto file, RawFile::open(path, {.read_only = false}));
  FailingDevice dev(std::move(file), fail_writes, fail_reads_from);
  return sync_wait(*reactor, qcow2::check_image(dev, nullptr, mode));
}

TEST(CheckLibrary, WriteErrorsStopTheRepair) {
  UQ_REQUIRE_TOOL("qemu-img");
  UQ_REQUIRE_TOOL("qemu-io");
  TempDir dir("check");
  ASSERT_TRUE(build(plain(), dir));
  ASSERT_TRUE(leak_free_cluster(Layout::read(dir.file(kImage))));
  auto before = read_file(dir.file(kImage));

  auto res = check_with(dir.file(kImage), true, UINT64_MAX, qcow2::RepairMode::kAll);
  ASSERT_TRUE(res.ok()) << res.error().message();
  EXPECT_FALSE(res->stopped.ok());
  EXPECT_GE(res->check_errors, 1u);
  EXPECT_TRUE(read_file(dir.file(kImage)) == before);

  // Without the fault the same call repairs: one leak fixed, nothing left.
  res = check_with(dir.file(kImage), false, UINT64_MAX, qcow2::RepairMode::kAll);
  ASSERT_TRUE(res.ok()) << res.error().message();
  EXPECT_TRUE(res->stopped.ok()) << res->stopped.message();
  EXPECT_EQ(res->leaks_fixed, 1u);
  EXPECT_EQ(res->leaks + res->corruptions + res->check_errors, 0u);
  EXPECT_TRUE(res->rechecked);
  EXPECT_EQ(qemu_check(dir.path(), kImage, {}).exit_code, 0);
}

TEST(CheckLibrary, ReadErrorsAreCheckErrors) {
  UQ_REQUIRE_TOOL("qemu-img");
  UQ_REQUIRE_TOOL("qemu-io");
  TempDir dir("check");
  ASSERT_TRUE(build(plain(), dir));
  Layout l = Layout::read(dir.file(kImage));
  // The L2 table comes after the header, L1 and refcount structures.
  uint64_t l2 = *peek_be64(l.path, l.l1_offset) & kOffsetMask;
  auto res = check_with(dir.file(kImage), false, l2, qcow2::RepairMode::kNone);
  ASSERT_TRUE(res.ok()) << res.error().message();
  EXPECT_FALSE(res->stopped.ok());
  EXPECT_GE(res->check_errors, 1u);
}

}  // namespace
}  // namespace uqcow::testing
