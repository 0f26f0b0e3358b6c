// Write-path interoperability: `uqcow io` and `uqcow convert` against qemu-io
// and qemu-img, the independent oracle.
//
// - IoScript: random operation scripts (unaligned pattern writes, zero writes
//   with and without unmap, discards, compressed writes, flushes, small
//   dumping reads) generated from a seed run through `uqcow io` on one image
//   and through `qemu-io` on its twin, created identically (both by qemu-img,
//   or uqcow's by `uqcow create`), over cluster sizes, refcount widths, lazy
//   refcounts, zstd, extended L2, compat 0.10 and backing files. Both tools
//   must print the same lines (timings aside) and exit alike; afterwards
//   qemu-img check and uqcow check find uqcow's image clean and qemu-img
//   compare finds the twins identical.
// - IoCommands: qemu-io's argument errors and edge cases, line for line.
// - IoAbort: `abort` leaves the image as a crash would: flushed data reads
//   back, the image at most leaks (a lazy-refcounts image stays dirty until
//   the next read-write open repairs it).
// - Convert: `uqcow convert -O qcow2 [-c] [-o ...]` from images with data,
//   zeros, backing files and compressed clusters: qemu-img check clean,
//   qemu-img compare identical to the source, no more clusters allocated than
//   by `qemu-img convert` with the same options, and `uqcow convert -O raw`
//   of the result identical too.
// Every failure message carries the commands that built and changed the
// images, so it can be reproduced in a shell.
#include <gtest/gtest.h>

#include <algorithm>
#include <cinttypes>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <ostream>
#include <random>
#include <regex>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "tests/testutil.h"

namespace uqcow::testing {
namespace {

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1024 * KiB;

std::string num(uint64_t v) { return std::to_string(v); }

std::string hex(unsigned v) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "0x%02x", v);
  return buf;
}

// qemu-io's statistics line carries timings and speeds: keep "4 KiB, 1 ops".
std::string without_timings(const std::string& out) {
  std::istringstream in(out);
  std::string line, result;
  while (std::getline(in, line)) {
    auto ops = line.find(" ops; ");
    if (ops != std::string::npos) line.erase(ops + 4);
    result += line + "\n";
  }
  return result;
}

// stderr without uqcow's own detail lines ("uqcow: write: ..."), which
// qemu-io does not print.
std::string without_uqcow_details(const std::string& err) {
  std::istringstream in(err);
  std::string line, result;
  while (std::getline(in, line)) {
    if (!line.starts_with("uqcow: ")) result += line + "\n";
  }
  return result;
}

// "N/M = ..." of qemu-img check: the allocated clusters, or nullopt.
std::optional<uint64_t> allocated_clusters(const std::string& check_output) {
  static const std::regex re(R"((\d+)/(\d+) = [0-9.]+% allocated)");
  std::smatch m;
  if (!std::regex_search(check_output, m, re)) return std::nullopt;
  return std::stoull(m[1].str());
}

double compressed_percent(const std::string& check_output) {
  static const std::regex re(R"(([0-9.]+)% compressed clusters)");
  std::smatch m;
  if (!std::regex_search(check_output, m, re)) return -1;
  return std::stod(m[1].str());
}

// ---- IoScript ---------------------------------------------------------------

struct Layout {
  std::string name;
  std::string options;  // qemu-img create -o
  uint64_t cluster;
  uint64_t size;        // not a multiple of large clusters: a partial last one
  bool backing = false;
};

void PrintTo(const Layout& l, std::ostream* os) { *os << l.name; }

std::vector<Layout> layouts() {
  const uint64_t odd = 3 * 512;
  return {
      {"cluster_512", "cluster_size=512", 512, 4 * MiB + odd},
      {"cluster_2M", "cluster_size=2M", 2 * MiB, 20 * MiB + odd},
      {"default", "", 64 * KiB, 12 * MiB + odd},
      {"refcount_bits_1", "refcount_bits=1", 64 * KiB, 12 * MiB + odd},
      {"refcount_bits_64", "refcount_bits=64", 64 * KiB, 12 * MiB + odd},
      {"lazy_refcounts", "lazy_refcounts=on", 64 * KiB, 12 * MiB + odd},
      {"zstd", "compression_type=zstd", 64 * KiB, 12 * MiB + odd},
      {"extended_l2", "extended_l2=on,cluster_size=64k", 64 * KiB, 12 * MiB + odd},
      {"compat_010", "compat=0.10", 64 * KiB, 12 * MiB + odd},
      {"backing", "", 64 * KiB, 12 * MiB + odd, true},
      {"backing_compat_010", "compat=0.10", 64 * KiB, 12 * MiB + odd, true},
      {"backing_extended_l2", "extended_l2=on,cluster_size=64k", 64 * KiB, 12 * MiB + odd, true},
  };
}

enum class Creator { kQemuImg, kUqcow };

// Generates qemu-io commands from a seed. It keeps a conservative model of
// each cluster to aim compressed writes: a cluster never touched is
// unallocated in both tools (compressed writes succeed), one whose last
// change was a pattern write or a compressed write holds data in both (a
// compressed write fails with EIO in both, as QEMU refuses to overwrite);
// after zero writes and discards the state is left unknown and such clusters
// are never compressed into.
//
// Once a request may have freed a compressed cluster, the rest of the
// session writes nothing compressed: QEMU 7.2 keeps appending compressed
// data to the host cluster it last used even after that cluster was freed
// and reallocated as a data cluster, which corrupts the oracle's image
// (IoCommands.CompressedWriteAfterItsHostClusterWasFreed has the details).
class ScriptGenerator {
 public:
  ScriptGenerator(const Layout& layout, uint32_t seed)
      : cs_(layout.cluster),
        size_(layout.size),
        clusters_((layout.size + layout.cluster - 1) / layout.cluster, State::kUntouched),
        rng_(seed) {}

  // A new qemu-io process: nothing is being appended to yet.
  void begin_session() { compression_blocked_ = false; }

  std::string next() {
    const uint64_t roll = below(100);
    if (roll < 34) return pattern_write();
    if (roll < 46) return zero_write(false);
    if (roll < 54) return zero_write(true);
    if (roll < 64) return discard();
    if (roll < 77) return compressed_write();
    if (roll < 80) return compressed_overwrite();
    if (roll < 88) return "flush";
    return dump();
  }

 private:
  enum class State : uint8_t { kUntouched, kData, kCompressed, kUnknown };

  uint64_t below(uint64_t n) { return n ? rng_() % n : 0; }
  unsigned pattern() { return 1 + static_cast<unsigned>(below(255)); }

  // Mostly in the first clusters, so that requests overlap and meet partly
  // written, zeroed and compressed clusters; sometimes anywhere.
  uint64_t pick_offset() {
    const uint64_t n = clusters_.size();
    const uint64_t cluster = below(8) == 0 ? below(n) : below(std::min<uint64_t>(n, 40));
    uint64_t within = 0;
    switch (below(4)) {
      case 0: within = 0; break;
      case 1: within = below(cs_ / 512) * 512; break;
      case 2: within = below(cs_); break;
      case 3: within = cs_ - 1 - below(std::min<uint64_t>(cs_, 700)); break;
    }
    return std::min(cluster * cs_ + within, size_ - 1);
  }

  uint64_t pick_length(uint64_t offset) {
    uint64_t len = 1;
    switch (below(5)) {
      case 0: len = 1 + below(600); break;
      case 1: len = 512 * (1 + below(16)); break;
      case 2: len = cs_ + below(1024) - std::min<uint64_t>(cs_ - 1, 512); break;
      case 3: len = 1 + below(3 * cs_); break;
      case 4: len = 4096 * (1 + below(8)); break;
    }
    return std::max<uint64_t>(1, std::min(len, size_ - offset));
  }

  void mark(uint64_t offset, uint64_t len, State state) {
    for (uint64_t c = offset / cs_; c <= (offset + len - 1) / cs_; ++c) {
      if (clusters_[c] == State::kCompressed) compression_blocked_ = true;
      clusters_[c] = state;
    }
  }

  // Cluster `c` as a compressed write: the whole cluster, or what the disk
  // has of its last one.
  uint64_t cluster_bytes(uint64_t c) const { return std::min(cs_, size_ - c * cs_); }

  std::string pattern_write() {
    const uint64_t off = pick_offset(), len = pick_length(off);
    mark(off, len, State::kData);
    return "write -P " + hex(pattern()) + " " + num(off) + " " + num(len);
  }

  std::string zero_write(bool unmap) {
    const uint64_t off = pick_offset(), len = pick_length(off);
    mark(off, len, State::kUnknown);
    return std::string(unmap ? "write -z -u " : "write -z ") + num(off) + " " + num(len);
  }

  std::string discard() {
    uint64_t off = pick_offset();
    if (below(2)) off = off / cs_ * cs_;  // whole clusters get discarded
    const uint64_t len = pick_length(off);
    mark(off, len, State::kUnknown);
    return "discard " + num(off) + " " + num(len);
  }

  // One to three untouched clusters (the last, partial one included), else
  // a pattern write.
  std::string compressed_write() {
    const uint64_t n = clusters_.size();
    for (int attempt = 0; attempt < 20 && !compression_blocked_; ++attempt) {
      const uint64_t first = below(4) == 0 ? n - 1 - below(std::min<uint64_t>(n, 3)) : below(std::min<uint64_t>(n, 40));
      const uint64_t count = std::min<uint64_t>(1 + below(3), n - first);
      bool untouched = true;
      for (uint64_t c = first; c < first + count; ++c) untouched = untouched && clusters_[c] == State::kUntouched;
      if (!untouched) continue;
      uint64_t len = 0;
      for (uint64_t c = first; c < first + count; ++c) {
        len += cluster_bytes(c);
        clusters_[c] = State::kCompressed;
      }
      return "write -c -P " + hex(pattern()) + " " + num(first * cs_) + " " + num(len);
    }
    return pattern_write();
  }

  // A cluster that holds data in both tools: both must refuse with EIO.
  std::string compressed_overwrite() {
    std::vector<uint64_t> data;
    for (uint64_t c = 0; c < clusters_.size(); ++c) {
      if (clusters_[c] == State::kData || clusters_[c] == State::kCompressed) data.push_back(c);
    }
    if (data.empty()) return pattern_write();
    const uint64_t c = data[below(data.size())];
    return "write -c -P " + hex(pattern()) + " " + num(c * cs_) + " " + num(cluster_bytes(c));
  }

  // The bytes themselves, in qemu-io's hex dump: a mid-script check of what
  // each tool reads back through its own caches.
  std::string dump() {
    const uint64_t off = pick_offset();
    return "read -v " + num(off) + " " + num(std::min<uint64_t>(1 + below(48), size_ - off));
  }

  const uint64_t cs_;
  const uint64_t size_;
  std::vector<State> clusters_;
  bool compression_blocked_ = false;
  std::mt19937_64 rng_;
};

using IoScriptParam = std::tuple<Layout, Creator, uint32_t>;

class IoScript : public ::testing::TestWithParam<IoScriptParam> {
 protected:
  void SetUp() override {
    if (!require_tool("qemu-img") || !require_tool("qemu-io")) return;
    ASSERT_FALSE(uqcow_binary().empty()) << "UQCOW is not set";
  }
};

constexpr int kSessions = 3;
constexpr int kCommandsPerSession = 20;

TEST_P(IoScript, SameResultAsQemuIo) {
  const auto& [layout, creator, seed] = GetParam();
  TempDir dir("write_interop");
  ImageBuilder b(dir.path());
  std::string backing_args;
  if (layout.backing) {
    // A backing file with data everywhere it reaches, ending inside a
    // cluster before the end of the overlay.
    const uint64_t base_size = layout.size / 2 / 512 * 512 + 7 * 512;
    b.create("base.qcow2", "qcow2", "", base_size);
    b.write("base.qcow2", "qcow2", {P(0, base_size, 0xb1), P(100000, 300000, 0xb2), P(base_size - 5000, 5000, 0xb3)});
  }
  b.create("q.qcow2", "qcow2", layout.options, layout.size, layout.backing ? "base.qcow2" : "",
           layout.backing ? "qcow2" : "");
  if (creator == Creator::kQemuImg) {
    b.create("u.qcow2", "qcow2", layout.options, layout.size, layout.backing ? "base.qcow2" : "",
             layout.backing ? "qcow2" : "");
  } else {
    std::vector<std::string> argv{uqcow_binary(), "create", "-q", "-f", "qcow2"};
    if (!layout.options.empty()) argv.insert(argv.end(), {"-o", layout.options});
    if (layout.backing) argv.insert(argv.end(), {"-b", "base.qcow2", "-F", "qcow2"});
    argv.insert(argv.end(), {"u.qcow2", num(layout.size)});
    b.run(argv);
  }
  ASSERT_TRUE(b.ok()) << b.error() << "\nscript:\n" << b.script();
  std::string script = b.script();

  ScriptGenerator gen(layout, seed);
  for (int session = 0; session < kSessions; ++session) {
    gen.begin_session();
    std::vector<std::string> qemu{"qemu-io", "-f", "qcow2"}, uqcow{"io", "-f", "qcow2"};
    for (int i = 0; i < kCommandsPerSession; ++i) {
      const std::string cmd = gen.next();
      qemu.insert(qemu.end(), {"-c", cmd});
      uqcow.insert(uqcow.end(), {"-c", cmd});
    }
    qemu.push_back("q.qcow2");
    uqcow.push_back("u.qcow2");
    CommandResult q = run_command(qemu, dir.path());
    CommandResult u = run_uqcow(uqcow, dir.path());
    script += q.command + "\n" + u.command + "\n";
    ASSERT_EQ(q.exit_code, u.exit_code) << "session " << session << ": qemu-io and uqcow io exit differently\n"
                                        << q.describe() << "\n" << u.describe() << "\nscript:\n" << script;
    ASSERT_EQ(without_timings(u.out), without_timings(q.out))
        << "session " << session << ": uqcow io prints what qemu-io does not\n"
        << u.describe() << "\nscript:\n" << script;
  }

  CommandResult check = run_command({"qemu-img", "check", "u.qcow2"}, dir.path());
  EXPECT_EQ(check.exit_code, 0) << check.describe() << "\nscript:\n" << script;
  EXPECT_EQ(check.out.find("leaked"), std::string::npos) << check.describe();
  CommandResult qemu_check = run_command({"qemu-img", "check", "q.qcow2"}, dir.path());
  EXPECT_EQ(qemu_check.exit_code, 0) << "the oracle's own image: " << qemu_check.describe();
  CommandResult own_check = run_uqcow({"check", "u.qcow2"}, dir.path());
  EXPECT_EQ(own_check.exit_code, 0) << own_check.describe() << "\nscript:\n" << script;
  CommandResult compare = run_command({"qemu-img", "compare", "q.qcow2", "u.qcow2"}, dir.path());
  EXPECT_EQ(compare.exit_code, 0) << compare.describe() << "\nscript:\n" << script;
  // A normal exit closes the image: a lazy-refcounts image is clean again.
  CommandResult info = run_command({"qemu-img", "info", "--output=json", "u.qcow2"}, dir.path());
  EXPECT_EQ(info.out.find("\"dirty-flag\": true"), std::string::npos) << info.describe();
}

std::string io_script_name(const ::testing::TestParamInfo<IoScriptParam>& info) {
  const auto& [layout, creator, seed] = info.param;
  return layout.name + (creator == Creator::kQemuImg ? "_qemu_created" : "_uqcow_created") + "_seed" +
         num(seed);
}

INSTANTIATE_TEST_SUITE_P(Layouts, IoScript,
                         ::testing::Combine(::testing::ValuesIn(layouts()),
                                            ::testing::Values(Creator::kQemuImg, Creator::kUqcow),
                                            ::testing::Range(1u, 9u)),
                         io_script_name);

// ---- IoCommands -------------------------------------------------------------

class IoCommands : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!require_tool("qemu-img") || !require_tool("qemu-io")) return;
    ASSERT_FALSE(uqcow_binary().empty()) << "UQCOW is not set";
    ASSERT_TRUE(Succeeded(run_command({"qemu-img", "create", "-q", "-f", "qcow2", q_, "4M"})));
    ASSERT_TRUE(Succeeded(run_command({"qemu-img", "create", "-q", "-f", "qcow2", u_, "4M"})));
    ASSERT_TRUE(write_file(dir_.file("pattern.bin"), std::vector<uint8_t>{'a', 'b', 'c'}));
    ASSERT_TRUE(write_file(dir_.file("empty.bin"), {}));
  }

  // Runs the commands through both tools, each on its own image: the exit
  // status, stdout (timings aside) and stderr (uqcow's detail lines aside)
  // must be the same.
  void expect_same(const std::vector<std::string>& commands, const std::vector<std::string>& options = {}) {
    std::vector<std::string> qemu{"qemu-io"}, uqcow{"io"};
    qemu.insert(qemu.end(), options.begin(), options.end());
    uqcow.insert(uqcow.end(), options.begin(), options.end());
    for (const auto& c : commands) {
      qemu.insert(qemu.end(), {"-c", c});
      uqcow.insert(uqcow.end(), {"-c", c});
    }
    qemu.push_back(q_);
    uqcow.push_back(u_);
    CommandResult q = run_command(qemu, dir_.path());
    CommandResult u = run_uqcow(uqcow, dir_.path());
    EXPECT_EQ(u.exit_code, q.exit_code) << q.describe() << "\n" << u.describe();
    EXPECT_EQ(without_timings(u.out), without_no_fallback(without_timings(q.out))) << u.describe();
    EXPECT_EQ(without_uqcow_details(u.err), q.err) << u.describe();
  }

  // The one known difference: uqcow's write has no -n (no-fallback zero
  // writes), so its synopsis does not list it.
  static std::string without_no_fallback(std::string out) {
    const std::string with_n = "write [-bcCfnquz]";
    for (auto pos = out.find(with_n); pos != std::string::npos; pos = out.find(with_n, pos)) {
      out.replace(pos, with_n.size(), "write [-bcCfquz]");
    }
    return out;
  }

  TempDir dir_{"io_commands"};
  std::string q_ = dir_.file("q.qcow2");
  std::string u_ = dir_.file("u.qcow2");
};

TEST_F(IoCommands, WriteDiscardFlushLikeQemuIo) {
  expect_same({"write -P 0x11 0 4096", "write -z 4096 4096", "write -z -u 8192 512", "discard 0 65536",
               "flush", "f", "write -c 65536 65536", "write -c -P 0x22 3M 1M", "read -v 3M 32",
               "write 4194303 1", "write 4M 0", "write -z -u 0 0", "write -c 0 0", "discard 4M 0",
               "discard -q 0 512", "write -q 0 512", "write -p 0 1", "write -f 0 512", "w 0 1", "d 0 1",
               "write -s pattern.bin 100 10", "read -v 96 16"});
}

TEST_F(IoCommands, ErrorsLikeQemuIo) {
  expect_same({"write -c 65536 65536", "write -c 65536 65536", "write -c 100 512", "write -c 131072 1000",
               "write -u 0 1", "write -z -P 1 0 1", "write -P 1 -s pattern.bin 0 1", "write 0 5M",
               "discard 4M 512", "write -r 0 512", "write 0", "write", "write -P 0x1ff 0 1", "write -x 0 1",
               "write 0 1 2", "write -c -f 0 512", "write abc 1", "write 0 3G", "write 4M 1", "write 5M 0",
               "discard 0", "discard 0 1 2", "discard 4M 1", "discard 5M 0", "discard 0 3G", "discard -x 0 1",
               "flush x", "abort x", "write -s nonexistent.bin 0 512", "write -s empty.bin 0 512"});
}

TEST_F(IoCommands, ZeroWinsOverCompressed) { expect_same({"write -z -c 0 65536", "read -v 0 16"}); }

TEST_F(IoCommands, ReadOnlyImageRefusesWrites) {
  std::vector<std::string> commands = {"write 0 1", "discard 0 512", "flush"};
  std::vector<std::string> qemu{"qemu-io", "-r"}, uqcow{"io", "-r"};
  for (const auto& c : commands) {
    qemu.insert(qemu.end(), {"-c", c});
    uqcow.insert(uqcow.end(), {"-c", c});
  }
  qemu.push_back(q_);
  uqcow.push_back(u_);
  CommandResult q = run_command(qemu);
  CommandResult u = run_uqcow(uqcow);
  EXPECT_EQ(u.exit_code, q.exit_code) << q.describe() << "\n" << u.describe();
  EXPECT_EQ(u.out, q.out) << u.describe();
  EXPECT_TRUE(contains_icase(u.err, "read-only")) << u.describe();
}

TEST_F(IoCommands, CompressedWriteOnRawIsNotSupported) {
  const std::string raw = dir_.file("r.raw");
  ASSERT_TRUE(Succeeded(run_command({"qemu-img", "create", "-q", "-f", "raw", raw, "1M"})));
  CommandResult q = run_command({"qemu-io", "-f", "raw", "-c", "write -c 0 65536", raw});
  CommandResult u = run_uqcow({"io", "-f", "raw", "-c", "write -c 0 65536", raw});
  EXPECT_EQ(u.exit_code, q.exit_code) << q.describe() << "\n" << u.describe();
  EXPECT_EQ(u.out, q.out) << u.describe();
}

// QEMU 7.2 keeps appending compressed data to the host cluster it last
// used for compressed data even after that cluster was freed and reused for
// a data cluster: with a backing file, the third command below leaves a
// data cluster with refcount 2 (qemu-img check: "ERROR OFLAG_COPIED data
// cluster"). uqcow must not: each sequence frees the cluster holding
// compressed data (a partial zero write copies the compressed cluster out, or
// an unmapping zero write drops it), lets a data cluster take its place, then
// writes compressed again. No oracle here: qemu-img check judges the image and
// qemu-io reads the data back.
TEST_F(IoCommands, CompressedWriteAfterItsHostClusterWasFreed) {
  struct Sequence {
    std::string name;
    std::string options;
    uint64_t size;
    bool backing;
    std::vector<std::string> commands;
    std::vector<std::string> reads;  // qemu-io read -P commands that must pass
  };
  const Sequence sequences[] = {
      {"cluster_2M", "cluster_size=2M", 20973056, false,
       {"write -c -P 0x8d 10485760 2097152", "write -z -u 8388608 5677260", "write -c -P 0x13 14680064 2097152"},
       {"read -P 0 8388608 5677260", "read -P 0x13 14680064 2097152"}},
      {"extended_l2", "extended_l2=on", 12584448, false,
       {"write -c -P 0xd7 2031616 65536", "write -z 2096784 4096", "write -c -P 0x68 0 65536"},
       {"read -P 0xd7 2031616 65168", "read -P 0 2096784 4096", "read -P 0x68 0 65536"}},
      {"backing", "", 12584448, true,
       {"write -c -P 0xd7 2031616 65536", "write -z 2096784 4096", "write -c -P 0x68 0 65536"},
       {"read -P 0xd7 2031616 65168", "read -P 0 2096784 4096", "read -P 0x68 0 65536"}},
  };
  ASSERT_TRUE(Succeeded(run_command({"qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M"}, dir_.path())));
  ASSERT_TRUE(Succeeded(run_command({"qemu-io", "-c", "write -P 0xb1 0 4M", "base.qcow2"}, dir_.path())));
  for (const Sequence& seq : sequences) {
    SCOPED_TRACE(seq.name);
    const std::string img = seq.name + ".qcow2";
    std::vector<std::string> create{"qemu-img", "create", "-q", "-f", "qcow2"};
    if (!seq.options.empty()) create.insert(create.end(), {"-o", seq.options});
    if (seq.backing) create.insert(create.end(), {"-b", "base.qcow2", "-F", "qcow2"});
    create.insert(create.end(), {img, num(seq.size)});
    ASSERT_TRUE(Succeeded(run_command(create, dir_.path())));
    std::vector<std::string> io{"io"};
    for (const auto& c : seq.commands) io.insert(io.end(), {"-c", c});
    io.push_back(img);
    CommandResult r = run_uqcow(io, dir_.path());
    EXPECT_TRUE(Succeeded(r));
    CommandResult check = run_command({"qemu-img", "check", img}, dir_.path());
    EXPECT_EQ(check.exit_code, 0) << r.command << "\n" << check.describe();
    std::vector<std::string> reads{"qemu-io", "-r"};
    for (const auto& c : seq.reads) reads.insert(reads.end(), {"-c", c});
    reads.push_back(img);
    EXPECT_TRUE(Succeeded(run_command(reads, dir_.path()))) << r.command;
  }
}

// QEMU refuses discards on compat=0.10 images with a backing file (v2 has no
// zero flag: dropping the cluster would show the backing file's old data),
// and reports success; the data stays.
TEST_F(IoCommands, DiscardKeepsDataOnCompat010WithBacking) {
  ASSERT_TRUE(Succeeded(run_command({"qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M"}, dir_.path())));
  ASSERT_TRUE(Succeeded(run_command({"qemu-io", "-c", "write -P 0xb1 0 4M", "base.qcow2"}, dir_.path())));
  for (const std::string& img : {q_, u_}) {
    ASSERT_TRUE(Succeeded(run_command({"qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b",
                                       "base.qcow2", "-F", "qcow2", img, "8M"},
                                      dir_.path())));
  }
  expect_same({"write -P 0x01 0 128k", "discard 0 64k", "discard 64k 100k", "read -v 0 16", "read -v 64k 16"});
  CommandResult compare = run_command({"qemu-img", "compare", q_, u_});
  EXPECT_EQ(compare.exit_code, 0) << compare.describe();
}

// ---- IoAbort ----------------------------------------------------------------

class IoAbort : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!require_tool("qemu-img") || !require_tool("qemu-io")) return;
    ASSERT_FALSE(uqcow_binary().empty()) << "UQCOW is not set";
  }
};

TEST_P(IoAbort, LeavesACrashedImage) {
  TempDir dir("io_abort");
  const std::string img = dir.file("img.qcow2");
  const bool lazy = GetParam().find("lazy_refcounts=on") != std::string::npos;
  ASSERT_TRUE(Succeeded(run_uqcow({"create", "-q", "-f", "qcow2", "-o", GetParam(), img, "8M"})));
  CommandResult r = run_uqcow({"io", "-c", "write -P 0x5a 0 192k", "-c", "flush", "-c", "write -P 0x5b 1M 64k",
                               "-c", "write -z 0 4k", "-c", "abort", "-c", "write -P 0x5c 2M 64k", img});
  ASSERT_EQ(r.exit_code, 128 + SIGABRT) << "abort must end the process as qemu-io's does:\n" << r.describe();
  EXPECT_EQ(r.out.find("offset 2097152"), std::string::npos) << "a command after abort ran:\n" << r.describe();

  CommandResult info = run_command({"qemu-img", "info", "--output=json", img});
  if (lazy) {
    // Not closed: the dirty bit set by the first write is still there.
    EXPECT_NE(info.out.find("\"dirty-flag\": true"), std::string::npos) << info.describe();
    // A read-write open repairs the image.
    ASSERT_TRUE(Succeeded(run_uqcow({"io", "-c", "flush", img})));
    CommandResult check = run_command({"qemu-img", "check", img});
    EXPECT_EQ(check.exit_code, 0) << check.describe();
  } else {
    CommandResult check = run_command({"qemu-img", "check", img});
    EXPECT_TRUE(check.exit_code == 0 || check.exit_code == 3) << "clean or leaks only:\n" << check.describe();
  }
  // What the flush made durable reads back (the first 4k may be zeroed or
  // not: that write was never flushed).
  EXPECT_TRUE(Succeeded(run_command({"qemu-io", "-r", "-c", "read -P 0x5a 4k 188k", img})));
}

INSTANTIATE_TEST_SUITE_P(Layouts, IoAbort, ::testing::Values("cluster_size=64k", "lazy_refcounts=on"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param == "lazy_refcounts=on" ? std::string("lazy_refcounts")
                                                                    : std::string("default");
                         });

// ---- Convert ----------------------------------------------------------------

struct ConvertSource {
  std::string name;
  std::string image;   // file name in the case directory
  std::string format;
  void (*build)(ImageBuilder&);
};

void PrintTo(const ConvertSource& s, std::ostream* os) { *os << s.name; }

// 3 MiB of incompressible bytes for `write -s`.
void random_file(ImageBuilder& b, const std::string& name, uint32_t seed) {
  b.create(name, "raw", "", 3 * MiB);
  b.random_bytes(name, 0, 3 * MiB, seed);
}

std::vector<ConvertSource> convert_sources() {
  return {
      {"data_and_zeros", "src.qcow2", "qcow2",
       [](ImageBuilder& b) {
         const uint64_t size = 24 * MiB + 1536;
         random_file(b, "random.bin", 7);
         b.create("src.qcow2", "qcow2", "", size);
         b.write("src.qcow2", "qcow2",
                 {P(1000, 300000, 0x11), Z(1 * MiB, 2 * MiB), P(5 * MiB, 3 * MiB, 0x22), ZU(6 * MiB, 256 * KiB),
                  D(7 * MiB, 128 * KiB), Z(7 * MiB + 300 * KiB + 5, 1000), P(20 * MiB, 1 * MiB, 0x00),
                  P(size - 512, 512, 0x33)},
                 {"write -s random.bin 10M 3M"});
       }},
      {"backing_chain", "top.qcow2", "qcow2",
       [](ImageBuilder& b) {
         random_file(b, "random.bin", 8);
         b.create("base.qcow2", "qcow2", "", 16 * MiB);
         b.write("base.qcow2", "qcow2", {P(0, 16 * MiB, 0x41)}, {"write -s random.bin 4M 3M"});
         b.create("top.qcow2", "qcow2", "cluster_size=4k", 24 * MiB + 1536, "base.qcow2", "qcow2");
         b.write("top.qcow2", "qcow2",
                 {Z(1 * MiB, 1 * MiB), D(3 * MiB, 1 * MiB), P(2 * MiB + 7, 100 * KiB, 0x42), ZU(8 * MiB, 64 * KiB),
                  P(15 * MiB, 2 * MiB, 0x44), P(23 * MiB, 1 * MiB, 0x43)});
       }},
      {"compressed_zstd", "src.qcow2", "qcow2",
       [](ImageBuilder& b) {
         random_file(b, "random.bin", 9);
         b.create("src.raw", "raw", "", 9 * MiB);
         b.write("src.raw", "raw", {P(0, 3 * MiB + 1000, 0x51), P(6 * MiB + 77, 2 * MiB, 0x52)},
                 {"write -s random.bin 3M 2M"});
         b.run({"qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", "src.raw",
                "src.qcow2"});
       }},
      {"raw_odd_size", "src.raw", "raw",
       [](ImageBuilder& b) {
         random_file(b, "random.bin", 10);
         b.run({"truncate", "-s", num(5 * MiB + 1000), "src.raw"});
         b.write("src.raw", "raw", {P(4096, 70000, 0x61), P(5 * MiB, 1000, 0x62)}, {"write -s random.bin 1M 1M"});
       }},
  };
}

struct ConvertTarget {
  std::string name;
  std::vector<std::string> args;  // after "convert"
  bool compressed = false;
};

void PrintTo(const ConvertTarget& t, std::ostream* os) { *os << t.name; }

std::vector<ConvertTarget> convert_targets() {
  return {
      {"qcow2", {"-O", "qcow2"}},
      {"compressed", {"-O", "qcow2", "-c"}, true},
      {"compressed_zstd_4k", {"-O", "qcow2", "-c", "-o", "cluster_size=4k,compression_type=zstd"}, true},
      {"cluster_512_refcount_bits_1", {"-O", "qcow2", "-o", "cluster_size=512,refcount_bits=1"}},
      {"compressed_2M", {"-O", "qcow2", "-c", "-o", "cluster_size=2M"}, true},
      {"compat_010_16k", {"-O", "qcow2", "-o", "compat=0.10,cluster_size=16k"}},
      {"compressed_compat_010", {"-O", "qcow2", "-c", "-o", "compat=0.10"}, true},
      {"compressed_extended_l2", {"-O", "qcow2", "-c", "-o", "extended_l2=on"}, true},
      {"prealloc_metadata", {"-O", "qcow2", "-o", "preallocation=metadata"}},
      {"prealloc_falloc", {"-O", "qcow2", "-o", "preallocation=falloc"}},
      {"prealloc_full_refcount_bits_64", {"-O", "qcow2", "-o", "preallocation=full,refcount_bits=64"}},
      {"compressed_lazy_refcounts", {"-O", "qcow2", "-c", "-o", "lazy_refcounts=on"}, true},
  };
}

using ConvertParam = std::tuple<ConvertSource, ConvertTarget>;

class Convert : public ::testing::TestWithParam<ConvertParam> {
 protected:
  void SetUp() override {
    if (!require_tool("qemu-img") || !require_tool("qemu-io")) return;
    ASSERT_FALSE(uqcow_binary().empty()) << "UQCOW is not set";
  }
};

TEST_P(Convert, ResultIsCleanAndIdentical) {
  const auto& [source, target] = GetParam();
  TempDir dir("convert");
  ImageBuilder b(dir.path());
  source.build(b);
  ASSERT_TRUE(b.ok()) << b.error() << "\nscript:\n" << b.script();
  std::string script = b.script();

  std::vector<std::string> args{"convert", "-f", source.format};
  args.insert(args.end(), target.args.begin(), target.args.end());
  args.insert(args.end(), {source.image, "out.qcow2"});
  CommandResult r = run_uqcow(args, dir.path());
  script += r.command + "\n";
  ASSERT_TRUE(Succeeded(r)) << "script:\n" << script;

  CommandResult check = run_command({"qemu-img", "check", "out.qcow2"}, dir.path());
  EXPECT_EQ(check.exit_code, 0) << check.describe() << "\nscript:\n" << script;
  CommandResult compare =
      run_command({"qemu-img", "compare", "-f", source.format, "-F", "qcow2", source.image, "out.qcow2"}, dir.path());
  EXPECT_EQ(compare.exit_code, 0) << compare.describe() << "\nscript:\n" << script;
  if (target.compressed) {
    EXPECT_GT(compressed_percent(check.out), 0) << "no compressed clusters:\n" << check.describe();
  }

  // Zeros are not written: no more clusters than qemu-img allocates.
  std::vector<std::string> qemu{"qemu-img", "convert", "-f", source.format};
  qemu.insert(qemu.end(), target.args.begin(), target.args.end());
  qemu.insert(qemu.end(), {source.image, "qemu.qcow2"});
  ASSERT_TRUE(Succeeded(run_command(qemu, dir.path())));
  CommandResult qemu_check = run_command({"qemu-img", "check", "qemu.qcow2"}, dir.path());
  auto ours = allocated_clusters(check.out), theirs = allocated_clusters(qemu_check.out);
  ASSERT_TRUE(ours && theirs) << check.describe() << "\n" << qemu_check.describe();
  EXPECT_LE(*ours, *theirs) << "uqcow convert allocated more clusters than qemu-img convert\nscript:\n" << script;

  // And back to raw.
  CommandResult raw = run_uqcow({"convert", "-O", "raw", "out.qcow2", "back.raw"}, dir.path());
  script += raw.command + "\n";
  ASSERT_TRUE(Succeeded(raw)) << "script:\n" << script;
  CommandResult compare_raw =
      run_command({"qemu-img", "compare", "-f", source.format, "-F", "raw", source.image, "back.raw"}, dir.path());
  EXPECT_EQ(compare_raw.exit_code, 0) << compare_raw.describe() << "\nscript:\n" << script;
}

std::string convert_name(const ::testing::TestParamInfo<ConvertParam>& info) {
  return std::get<0>(info.param).name + "_to_" + std::get<1>(info.param).name;
}

INSTANTIATE_TEST_SUITE_P(Matrix, Convert,
                         ::testing::Combine(::testing::ValuesIn(convert_sources()),
                                            ::testing::ValuesIn(convert_targets())),
                         convert_name);

class ConvertEdges : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!require_tool("qemu-img") || !require_tool("qemu-io")) return;
    ASSERT_FALSE(uqcow_binary().empty()) << "UQCOW is not set";
  }
  TempDir dir_{"convert_edges"};
};

TEST_F(ConvertEdges, SnapshotToQcow2) {
  ImageBuilder b(dir_.path());
  b.create("src.qcow2", "qcow2", "", 8 * MiB);
  b.write("src.qcow2", "qcow2", {P(0, 1 * MiB, 0x71)});
  b.run({"qemu-img", "snapshot", "-c", "s1", "src.qcow2"});
  b.write("src.qcow2", "qcow2", {P(512 * KiB, 2 * MiB, 0x72)});
  b.run({"qemu-img", "convert", "-l", "snapshot.name=s1", "-O", "raw", "src.qcow2", "s1.raw"});
  ASSERT_TRUE(b.ok()) << b.error() << "\nscript:\n" << b.script();
  ASSERT_TRUE(Succeeded(run_uqcow({"convert", "-c", "-l", "s1", "-O", "qcow2", "src.qcow2", "s1.qcow2"}, dir_.path())));
  EXPECT_TRUE(Succeeded(run_command({"qemu-img", "check", "s1.qcow2"}, dir_.path())));
  EXPECT_TRUE(Succeeded(run_command({"qemu-img", "compare", "-F", "raw", "s1.qcow2", "s1.raw"}, dir_.path())));
}

TEST_F(ConvertEdges, RefusesWhatQemuImgRefuses) {
  const std::string src = dir_.file("src.qcow2");
  ASSERT_TRUE(Succeeded(run_command({"qemu-img", "create", "-q", "-f", "qcow2", src, "1M"})));
  const std::vector<std::vector<std::string>> refused = {
      {"convert", "-c", "-O", "raw", src, dir_.file("a")},
      {"convert", "-c", "-O", "qcow2", "-o", "preallocation=metadata", src, dir_.file("b")},
      {"convert", "-O", "qcow2", "-o", "no_such_option=1", src, dir_.file("c")},
      {"convert", "-O", "qcow2", "-o", "backing_file=src.qcow2", src, dir_.file("d")},
      {"convert", "-O", "vmdk", src, dir_.file("e")},
  };
  for (const auto& args : refused) {
    CommandResult r = run_uqcow(args);
    EXPECT_EQ(r.exit_code, 1) << r.describe();
    EXPECT_TRUE(r.err.starts_with("uqcow: ")) << r.describe();
  }
}

}  // namespace
}  // namespace uqcow::testing
