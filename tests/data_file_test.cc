// External data files written by uqcow (issue 13), against qemu-img and
// qemu-io 7.2 as the oracle. Every case runs over data-file layouts (cluster
// sizes, extended L2, lazy refcounts, partial last cluster), each with a
// plain data file and with data_file_raw=on:
//  - Create: `uqcow create -o data_file=...` makes what qemu-img makes: the
//    same mapping (a raw data file is mapped 1:1 from the start), a data
//    file sized to the disk, qemu-img check clean.
//  - WriteReadBack: `uqcow io` writes (unaligned, cluster 0, across
//    clusters) read back by qemu-io with their patterns; a raw data file
//    reads as the disk on its own.
//  - Twins: one seeded script of writes, zero writes (with and without
//    unmap) and discards run by uqcow on one image, by qemu-io on its twin,
//    and by both tools in turns on a third: qemu-img check clean after
//    every step, the three identical, uqcow's mapping equal to QEMU's.
//  - DiscardThenRewrite: data written again over a discarded cluster
//    survives later flushes (a data-file cluster is reused by its own guest
//    offset, so a discard must never land after that).
//  - Resize: grow and shrink sized as qemu-img sizes them (the data file
//    follows, a raw one mapped 1:1 over the added area).
//  - Convert: `uqcow convert -O qcow2 -o data_file=...` reads back identical
//    to the source; -c with a data file is refused before anything exists.
//  - Refusals as QEMU's: internal snapshots, compressed writes.
//  - MismatchedHostOffset: an L2 entry whose data-file offset is not its
//    guest offset is refused on read and write (the write marks the image
//    corrupt; QEMU 7.2 refuses only the read), and nothing is written
//    through it.
//  - ConcurrentWrites: overlapping in-process writes and discards in flight
//    on one data-file image (the deterministic simulation of tests/sim
//    models the image file only).
// Commands run in the images' directory with relative names: that is where
// both tools resolve a relative data_file name.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <random>
#include <regex>
#include <string>
#include <vector>

#include "engine/when_all.h"
#include "qcow2/image.h"
#include "tests/testutil.h"

namespace uqcow::testing {
namespace {

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1024 * KiB;

struct Layout {
  std::string name;
  uint64_t cluster;
  uint64_t size;        // ends in a partial cluster where the cluster allows
  std::string options;  // qcow2 creation options besides data_file*
  bool raw;             // data_file_raw=on
};

std::vector<Layout> layouts() {
  std::vector<Layout> v;
  for (bool raw : {false, true}) {
    const std::string r = raw ? "_raw" : "";
    v.push_back({"c64k" + r, 64 * KiB, 3 * MiB + 1536, "cluster_size=64k", raw});
    v.push_back({"c4k_lazy" + r, 4 * KiB, 1 * MiB + 512, "cluster_size=4k,lazy_refcounts=on", raw});
    v.push_back({"c32k_extl2" + r, 32 * KiB, 2 * MiB + 8 * KiB, "cluster_size=32k,extended_l2=on", raw});
  }
  return v;
}

std::string num(uint64_t v) { return std::to_string(v); }

std::string hex(unsigned v) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "0x%02x", v);
  return buf;
}

uint64_t file_size(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : ~uint64_t{0};
}

class DataFileTest : public ::testing::TestWithParam<Layout> {
 protected:
  void SetUp() override {
    for (const char* tool : {"qemu-img", "qemu-io"}) {
      if (!require_tool(tool)) return;
    }
    ASSERT_FALSE(uqcow_binary().empty()) << "UQCOW is not set";
  }

  const Layout& layout() const { return GetParam(); }
  std::string file(const std::string& name) const { return dir_.file(name); }

  // "data_file=NAME.data[,data_file_raw=on]" plus the layout's options.
  std::string create_options(const std::string& name) const {
    return layout().options + ",data_file=" + name + ".data" + (layout().raw ? ",data_file_raw=on" : "");
  }

  CommandResult qemu_img(std::vector<std::string> args) {
    args.insert(args.begin(), "qemu-img");
    return log(run_command(args, dir_.path()));
  }
  CommandResult qemu_io(const std::string& name, const std::vector<std::string>& cmds) {
    std::vector<std::string> argv{"qemu-io", "-f", "qcow2"};
    for (const auto& c : cmds) argv.insert(argv.end(), {"-c", c});
    argv.push_back(name);
    return log(run_command(argv, dir_.path()));
  }
  CommandResult uqcow(const std::vector<std::string>& args) { return log(run_uqcow(args, dir_.path())); }
  CommandResult uqcow_io(const std::string& name, const std::vector<std::string>& cmds) {
    std::vector<std::string> argv{"io", "-f", "qcow2"};
    for (const auto& c : cmds) argv.insert(argv.end(), {"-c", c});
    argv.push_back(name);
    return uqcow(argv);
  }

  // qemu-img create with the layout's data-file options.
  void qemu_create(const std::string& name, uint64_t size) {
    ASSERT_TRUE(Succeeded(qemu_img({"create", "-q", "-f", "qcow2", "-o", create_options(name), name, num(size)})))
        << history();
  }
  void uqcow_create(const std::string& name, uint64_t size) {
    ASSERT_TRUE(Succeeded(uqcow({"create", "-q", "-f", "qcow2", "-o", create_options(name), name, num(size)})))
        << history();
  }

  // qemu-img check finds no error, no leak; with a raw data file, the data
  // file alone reads as the disk.
  void expect_clean(const std::string& name) {
    CommandResult r = qemu_img({"check", name});
    EXPECT_TRUE(r.ok() && r.out.find("No errors were found") != std::string::npos)
        << r.describe() << "\n" << history();
    if (layout().raw) expect_identical(name, "qcow2", name + ".data", "raw");
  }
  void expect_identical(const std::string& a, const std::string& fa, const std::string& b, const std::string& fb) {
    CommandResult r = qemu_img({"compare", "-f", fa, "-F", fb, a, b});
    EXPECT_TRUE(r.ok()) << r.describe() << "\n" << history();
  }
  // qemu-img map: every range with a host offset has it at its guest offset
  // (QEMU refuses anything else with a data file).
  void expect_host_is_guest(const std::string& name) {
    const std::string m = map(name);
    static const std::regex range(R"re("start": (\d+),[^}]*"offset": (\d+))re");
    for (auto it = std::sregex_iterator(m.begin(), m.end(), range); it != std::sregex_iterator(); ++it) {
      EXPECT_EQ((*it)[1].str(), (*it)[2].str()) << m << history();
    }
  }
  std::string map(const std::string& name) {
    CommandResult r = qemu_img({"map", "--output=json", name});
    EXPECT_TRUE(r.ok()) << r.describe();
    return r.out;
  }

  // Every command run so far, for failure messages: a reproducer.
  std::string history() const { return "cd " + dir_.path() + "\n" + history_; }

  TempDir dir_{"uqcow_data_file"};

 private:
  CommandResult log(CommandResult r) {
    history_ += r.command + "    # exit " + std::to_string(r.exit_code) + "\n";
    return r;
  }
  std::string history_;
};

TEST_P(DataFileTest, CreateMatchesQemuImg) {
  const uint64_t size = layout().size;
  uqcow_create("u.qcow2", size);
  qemu_create("q.qcow2", size);
  // qemu-img sizes the data file to the disk, raw or not (a raw one
  // preallocated to the end of the last cluster or subcluster).
  EXPECT_GE(file_size(file("u.qcow2.data")), size);
  EXPECT_EQ(file_size(file("u.qcow2.data")), file_size(file("q.qcow2.data")));
  expect_clean("u.qcow2");
  // A raw data file is mapped 1:1 from the start (QEMU forces
  // preallocation=metadata); a plain one maps nothing yet.
  EXPECT_EQ(map("u.qcow2"), map("q.qcow2")) << history();
  CommandResult info = qemu_img({"info", "u.qcow2"});
  EXPECT_NE(info.out.find("data file: u.qcow2.data"), std::string::npos) << info.describe();
  EXPECT_NE(info.out.find(layout().raw ? "data file raw: true" : "data file raw: false"), std::string::npos)
      << info.describe();
}

TEST_P(DataFileTest, WriteReadBackByQemuIo) {
  const uint64_t cs = layout().cluster, size = layout().size;
  uqcow_create("d.qcow2", size);
  // Cluster 0 (whose L2 entry has offset 0: COPIED alone says allocated),
  // an unaligned write across two clusters, one into the partial last
  // cluster, and a rewrite of part of an allocated cluster.
  const std::vector<std::string> writes{
      "write -P 0x11 0 " + num(cs / 2 + 100),
      "write -P 0x22 " + num(3 * cs - 700) + " " + num(cs + 1400),
      "write -P 0x33 " + num(size - 700) + " 700",
      "write -P 0x44 " + num(cs / 4) + " 512",
  };
  CommandResult w = uqcow_io("d.qcow2", writes);
  ASSERT_TRUE(Succeeded(w)) << history();
  expect_clean("d.qcow2");
  CommandResult r = qemu_io("d.qcow2", {
      "read -P 0x11 0 " + num(cs / 4),
      "read -P 0x44 " + num(cs / 4) + " 512",
      "read -P 0x11 " + num(cs / 4 + 512) + " " + num(cs / 4 + 100 - 512),
      "read -P 0 " + num(cs / 2 + 100) + " " + num(3 * cs - 700 - (cs / 2 + 100)),
      "read -P 0x22 " + num(3 * cs - 700) + " " + num(cs + 1400),
      "read -P 0 " + num(4 * cs + 700) + " " + num(size - 700 - (4 * cs + 700)),
      "read -P 0x33 " + num(size - 700) + " 700",
  });
  EXPECT_TRUE(r.ok() && r.out.find("Pattern verification failed") == std::string::npos) << r.describe() << history();
  // The data went to the data file: the qcow2 file holds metadata only.
  EXPECT_LT(file_size(file("d.qcow2")), 8 * std::max<uint64_t>(cs, 64 * KiB)) << history();
}

// One seeded script of qemu-io commands over the whole disk: pattern
// writes (unaligned, some cluster aligned), zero writes with and without
// unmap, discards, flushes.
std::vector<std::string> script(uint64_t seed, uint64_t size, uint64_t cs, int count) {
  std::mt19937_64 rng(seed);
  std::vector<std::string> cmds;
  for (int i = 0; i < count; ++i) {
    uint64_t len = 1 + rng() % (4 * cs);
    uint64_t off = rng() % size;
    if (rng() % 3 == 0) {
      off = off / cs * cs;
      len = (len + cs - 1) / cs * cs;
    }
    len = std::min(len, size - off);
    switch (rng() % 8) {
      case 0: cmds.push_back("write -z " + num(off) + " " + num(len)); break;
      case 1: cmds.push_back("write -z -u " + num(off) + " " + num(len)); break;
      case 2: cmds.push_back("discard " + num(off) + " " + num(len)); break;
      case 3: cmds.push_back("flush"); break;
      default: cmds.push_back("write -P " + hex(1 + static_cast<unsigned>(rng() % 250)) + " " + num(off) + " " +
                              num(len));
    }
  }
  return cmds;
}

TEST_P(DataFileTest, TwinsMatchQemuIo) {
  const uint64_t cs = layout().cluster, size = layout().size;
  for (uint64_t seed : {1, 2, 3}) {
    SCOPED_TRACE("seed " + num(seed));
    const std::string u = "u" + num(seed) + ".qcow2", q = "q" + num(seed) + ".qcow2", m = "m" + num(seed) + ".qcow2";
    // uqcow writes an image qemu-img made, and its own.
    qemu_create(u, size);
    qemu_create(q, size);
    uqcow_create(m, size);
    if (HasFatalFailure()) return;
    constexpr int kChunks = 4, kPerChunk = 12;
    const std::vector<std::string> all = script(seed, size, cs, kChunks * kPerChunk);
    for (int c = 0; c < kChunks; ++c) {
      const std::vector<std::string> chunk(all.begin() + c * kPerChunk, all.begin() + (c + 1) * kPerChunk);
      ASSERT_TRUE(Succeeded(uqcow_io(u, chunk))) << history();
      ASSERT_TRUE(Succeeded(qemu_io(q, chunk))) << history();
      // Turns: uqcow and qemu-io write the same image.
      ASSERT_TRUE(Succeeded(c % 2 ? qemu_io(m, chunk) : uqcow_io(m, chunk))) << history();
      expect_clean(u);
      expect_clean(m);
      expect_identical(u, "qcow2", q, "qcow2");
      expect_identical(m, "qcow2", q, "qcow2");
      // Every host offset is its guest offset.
      expect_host_is_guest(u);
      expect_host_is_guest(m);
    }
    // uqcow reads what qemu-io wrote.
    CommandResult raw_u = uqcow({"convert", "-O", "raw", q, "q_by_uqcow.raw"});
    ASSERT_TRUE(Succeeded(raw_u)) << history();
    expect_identical("q_by_uqcow.raw", "raw", q, "qcow2");
    if (HasFailure()) return;
  }
}

TEST_P(DataFileTest, DiscardThenRewriteKeepsData) {
  const uint64_t cs = layout().cluster;
  uqcow_create("d.qcow2", layout().size);
  // The discard of cluster 1 is followed by new data in the same cluster
  // and then by flushes and more frees: it must not reach the data file
  // after the new data did.
  ASSERT_TRUE(Succeeded(uqcow_io("d.qcow2", {
      "write -P 0x11 0 " + num(4 * cs),
      "discard " + num(cs) + " " + num(cs),
      "write -P 0x22 " + num(cs) + " " + num(cs / 2),
      "write -z -u " + num(2 * cs) + " " + num(cs),
      "write -P 0x33 " + num(2 * cs + 512) + " 512",
      "flush",
      "discard " + num(3 * cs) + " " + num(cs),
      "flush",
  }))) << history();
  expect_clean("d.qcow2");
  CommandResult r = qemu_io("d.qcow2", {
      "read -P 0x11 0 " + num(cs),
      "read -P 0x22 " + num(cs) + " " + num(cs / 2),
      "read -P 0 " + num(cs + cs / 2) + " " + num(cs / 2 + 512),
      "read -P 0x33 " + num(2 * cs + 512) + " 512",
      "read -P 0 " + num(2 * cs + 1024) + " " + num(2 * cs - 1024),
  });
  EXPECT_TRUE(r.ok() && r.out.find("Pattern verification failed") == std::string::npos) << r.describe() << history();
}

TEST_P(DataFileTest, ResizeAsQemuImg) {
  const uint64_t cs = layout().cluster, size = layout().size;
  uqcow_create("u.qcow2", size);
  qemu_create("q.qcow2", size);
  const std::vector<std::string> before{"write -P 0x55 " + num(size - 1000) + " 1000"};
  ASSERT_TRUE(Succeeded(uqcow_io("u.qcow2", before))) << history();
  ASSERT_TRUE(Succeeded(qemu_io("q.qcow2", before))) << history();
  const uint64_t grown = size + 5 * cs + 3 * 512;
  ASSERT_TRUE(Succeeded(uqcow({"resize", "u.qcow2", num(grown)}))) << history();
  ASSERT_TRUE(Succeeded(qemu_img({"resize", "q.qcow2", num(grown)}))) << history();
  // The data file follows (a raw one to the end of its last cluster).
  EXPECT_EQ(file_size(file("u.qcow2.data")), file_size(file("q.qcow2.data"))) << history();
  EXPECT_GE(file_size(file("u.qcow2.data")), grown) << history();
  EXPECT_EQ(map("u.qcow2"), map("q.qcow2")) << history();
  expect_clean("u.qcow2");
  expect_identical("u.qcow2", "qcow2", "q.qcow2", "qcow2");
  // Writes into the added area, read back by qemu-io.
  ASSERT_TRUE(Succeeded(uqcow_io("u.qcow2", {"write -P 0x66 " + num(size + cs) + " " + num(2 * cs)}))) << history();
  expect_clean("u.qcow2");
  CommandResult r = qemu_io("u.qcow2", {"read -P 0x55 " + num(size - 1000) + " 1000",
                                        "read -P 0 " + num(size) + " " + num(cs),
                                        "read -P 0x66 " + num(size + cs) + " " + num(2 * cs),
                                        "read -P 0 " + num(size + 3 * cs) + " " + num(grown - size - 3 * cs)});
  EXPECT_TRUE(r.ok() && r.out.find("Pattern verification failed") == std::string::npos) << r.describe() << history();
}

TEST_P(DataFileTest, ShrinkAsQemuImg) {
  // Shrinking over unallocated clusters: the data file follows, as
  // qemu-img's does. (A raw data file maps every cluster, and uqcow refuses
  // to shrink over allocated clusters.)
  if (layout().raw) GTEST_SKIP() << "every cluster of a raw data file is allocated";
  const uint64_t cs = layout().cluster, size = layout().size;
  uqcow_create("u.qcow2", size);
  qemu_create("q.qcow2", size);
  const std::vector<std::string> writes{"write -P 0x55 100 " + num(cs)};
  ASSERT_TRUE(Succeeded(uqcow_io("u.qcow2", writes))) << history();
  ASSERT_TRUE(Succeeded(qemu_io("q.qcow2", writes))) << history();
  const uint64_t shrunk = 2 * cs + 512;
  ASSERT_TRUE(Succeeded(uqcow({"resize", "--shrink", "u.qcow2", num(shrunk)}))) << history();
  ASSERT_TRUE(Succeeded(qemu_img({"resize", "--shrink", "q.qcow2", num(shrunk)}))) << history();
  EXPECT_EQ(file_size(file("u.qcow2.data")), shrunk) << history();
  EXPECT_EQ(file_size(file("q.qcow2.data")), shrunk) << history();
  expect_clean("u.qcow2");
  expect_identical("u.qcow2", "qcow2", "q.qcow2", "qcow2");
}

TEST_P(DataFileTest, ConvertReadsBackIdentical) {
  const uint64_t cs = layout().cluster, size = layout().size;
  ASSERT_TRUE(Succeeded(qemu_img({"create", "-q", "-f", "qcow2", "src.qcow2", num(size)}))) << history();
  ASSERT_TRUE(Succeeded(qemu_io("src.qcow2", {"write -P 0x71 0 " + num(3 * cs + 100),
                                              "write -z " + num(cs) + " " + num(cs),
                                              "write -P 0x72 " + num(size / 2 + 333) + " " + num(2 * cs),
                                              "write -P 0x73 " + num(size - 10) + " 10"})))
      << history();
  CommandResult c = uqcow({"convert", "-O", "qcow2", "-o", create_options("out.qcow2"), "src.qcow2", "out.qcow2"});
  ASSERT_TRUE(Succeeded(c)) << history();
  ASSERT_TRUE(Succeeded(qemu_img({"convert", "-O", "qcow2", "-o", create_options("twin.qcow2"), "src.qcow2",
                                  "twin.qcow2"})))
      << history();
  EXPECT_EQ(file_size(file("out.qcow2.data")), file_size(file("twin.qcow2.data"))) << history();
  expect_clean("out.qcow2");
  expect_identical("src.qcow2", "qcow2", "out.qcow2", "qcow2");
  CommandResult r = qemu_io("out.qcow2", {"read -P 0x71 0 " + num(cs), "read -P 0 " + num(cs) + " " + num(cs),
                                          "read -P 0x73 " + num(size - 10) + " 10"});
  EXPECT_TRUE(r.ok() && r.out.find("Pattern verification failed") == std::string::npos) << r.describe() << history();
}

TEST_P(DataFileTest, SnapshotsAndCompressionRefusedAsQemu) {
  const uint64_t cs = layout().cluster;
  uqcow_create("d.qcow2", layout().size);
  ASSERT_TRUE(Succeeded(uqcow_io("d.qcow2", {"write -P 0x5a 0 " + num(2 * cs)}))) << history();
  // qemu-img: "Could not create snapshot 's1': -95 (Operation not supported)".
  CommandResult q = qemu_img({"snapshot", "-c", "s1", "d.qcow2"});
  CommandResult u = uqcow({"snapshot", "-c", "s1", "d.qcow2"});
  EXPECT_FALSE(q.ok()) << q.describe();
  EXPECT_EQ(u.exit_code, q.exit_code) << u.describe();
  EXPECT_NE(u.err.find("Could not create snapshot 's1'"), std::string::npos) << u.describe();
  EXPECT_NE(u.err.find("external data file"), std::string::npos) << u.describe();
  CommandResult list = qemu_img({"snapshot", "-l", "d.qcow2"});
  EXPECT_TRUE(list.ok() && list.out.empty()) << list.describe();
  // qemu-io: "write failed: Operation not supported", and the cluster is
  // left as it was.
  const std::vector<std::string> compressed{"write -c -P 0x77 " + num(4 * cs) + " " + num(cs)};
  CommandResult qc = qemu_io("d.qcow2", compressed);
  CommandResult uc = uqcow_io("d.qcow2", compressed);
  EXPECT_NE((qc.out + qc.err).find("write failed: Operation not supported"), std::string::npos) << qc.describe();
  EXPECT_NE((uc.out + uc.err).find("write failed: Operation not supported"), std::string::npos) << uc.describe();
  expect_clean("d.qcow2");
  CommandResult r = qemu_io("d.qcow2", {"read -P 0x5a 0 " + num(2 * cs), "read -P 0 " + num(4 * cs) + " " + num(cs)});
  EXPECT_TRUE(r.ok() && r.out.find("Pattern verification failed") == std::string::npos) << r.describe() << history();
  // convert -c cannot write a data file: refused before anything is made.
  CommandResult cc = uqcow({"convert", "-c", "-O", "qcow2", "-o", create_options("c.qcow2"), "d.qcow2", "c.qcow2"});
  EXPECT_EQ(cc.exit_code, 1) << cc.describe();
  EXPECT_NE(cc.err.find("external data file"), std::string::npos) << cc.describe();
  EXPECT_EQ(file_size(file("c.qcow2")), ~uint64_t{0});
  EXPECT_EQ(file_size(file("c.qcow2.data")), ~uint64_t{0});
}

TEST_P(DataFileTest, MismatchedHostOffsetRefused) {
  const uint64_t cs = layout().cluster;
  qemu_create("d.qcow2", layout().size);
  ASSERT_TRUE(Succeeded(qemu_io("d.qcow2", {"write -P 0x11 " + num(cs) + " " + num(cs),
                                            "write -P 0x22 " + num(2 * cs) + " " + num(cs)})))
      << history();
  // Guest cluster 1's L2 entry made to point at cluster 2's data.
  auto l1_offset = peek_be64(file("d.qcow2"), 40);
  ASSERT_TRUE(l1_offset);
  auto l1e = peek_be64(file("d.qcow2"), *l1_offset);
  ASSERT_TRUE(l1e);
  const uint64_t l2 = *l1e & 0x00fffffffffffe00ull;
  const uint64_t entry_bytes = layout().options.find("extended_l2=on") != std::string::npos ? 16 : 8;
  const uint64_t copied = 1ull << 63;
  ASSERT_EQ(peek_be64(file("d.qcow2"), l2 + entry_bytes), copied | cs);
  ASSERT_TRUE(patch_be64(file("d.qcow2"), l2 + entry_bytes, copied | (2 * cs)));
  // A copy of the damaged image (same data file) for QEMU, the oracle.
  ASSERT_TRUE(Succeeded(run_command({"cp", file("d.qcow2"), file("q.qcow2")}))) << history();
  // uqcow refuses the read and the write, naming the mismatch, and the
  // write marks the image corrupt. (Deliberately stricter than QEMU 7.2,
  // whose read path refuses the entry but whose write path writes through
  // it, into guest cluster 2's data.)
  CommandResult ur = uqcow({"io", "-r", "-f", "qcow2", "-c", "read 0 " + num(2 * cs), "d.qcow2"});
  EXPECT_NE(ur.out.find("read failed"), std::string::npos) << ur.describe();
  EXPECT_NE((ur.out + ur.err).find("does not match the guest cluster offset"), std::string::npos) << ur.describe();
  CommandResult uw = uqcow_io("d.qcow2", {"write -P 0x33 " + num(cs + 512) + " 512"});
  EXPECT_NE(uw.out.find("write failed"), std::string::npos) << uw.describe();
  EXPECT_NE((uw.out + uw.err).find("does not match the guest cluster offset"), std::string::npos) << uw.describe();
  // Nothing went through the entry: cluster 2 of the data file is intact.
  auto data = read_file(file("d.qcow2.data"));
  ASSERT_TRUE(data);
  ASSERT_GE(data->size(), 3 * cs);
  std::vector<uint8_t> want(cs, 0x22);
  EXPECT_TRUE(SameBytes(std::span<const uint8_t>(data->data() + 2 * cs, cs), want, 2 * cs));
  // QEMU, the oracle, refuses the read too, and marks its copy corrupt.
  CommandResult qr = qemu_io("q.qcow2", {"read 0 " + num(2 * cs)});
  EXPECT_NE(qr.out.find("read failed"), std::string::npos) << "QEMU accepts it: " << qr.describe();
  for (const char* name : {"d.qcow2", "q.qcow2"}) {
    CommandResult info = qemu_img({"info", "-U", name});
    EXPECT_NE(info.out.find("corrupt: true"), std::string::npos) << info.describe() << history();
  }
}

// Writes and discards in flight together on one data-file image, in one
// process: requests into the same clusters (disjoint bytes) wait for each
// other's allocations; discards of other clusters run beside them.
TEST_P(DataFileTest, ConcurrentWritesInFlight) {
  const uint64_t cs = layout().cluster, size = layout().size;
  uqcow_create("d.qcow2", size);
  ASSERT_TRUE(Succeeded(uqcow_io("d.qcow2", {"write -P 0xee " + num(8 * cs) + " " + num(4 * cs)}))) << history();
  OpenOptions o;
  o.read_only = false;
  auto disk = SyncDisk::open(file("d.qcow2"), o);
  ASSERT_TRUE(disk.ok()) << disk.error().message();
  std::vector<uint8_t> model(size, 0);
  std::fill(model.begin() + 8 * cs, model.begin() + 12 * cs, 0xee);
  // 32 pieces of 8 clusters, each written by its own request, shuffled.
  const uint64_t piece = cs / 4;
  std::vector<uint64_t> offsets;
  for (uint64_t off = 0; off < 8 * cs; off += piece) offsets.push_back(off);
  std::shuffle(offsets.begin(), offsets.end(), std::mt19937_64(7));
  std::vector<std::vector<std::byte>> bufs;
  bufs.reserve(offsets.size());  // the tasks hold spans of these
  std::vector<Task<Status>> tasks;
  for (uint64_t off : offsets) {
    const auto pattern = static_cast<uint8_t>(1 + off / piece);
    bufs.emplace_back(piece, std::byte{pattern});
    std::fill(model.begin() + off, model.begin() + off + piece, pattern);
    tasks.push_back((*disk)->disk().write(off, bufs.back()));
  }
  tasks.push_back((*disk)->disk().discard(8 * cs, 2 * cs));
  std::fill(model.begin() + 8 * cs, model.begin() + 10 * cs, 0);
  tasks.push_back((*disk)->disk().write_zeroes(10 * cs, cs, true));
  std::fill(model.begin() + 10 * cs, model.begin() + 11 * cs, 0);
  std::vector<Status> results = (*disk)->run(when_all(std::move(tasks)));
  for (const Status& s : results) EXPECT_TRUE(s.ok()) << s.message();
  auto all = (*disk)->read_all();
  ASSERT_TRUE(all.ok()) << all.error().message();
  EXPECT_TRUE(SameBytes(*all, model));
  ASSERT_TRUE((*disk)->close().ok());
  expect_clean("d.qcow2");
  ASSERT_TRUE(write_file(file("model.raw"), model));
  expect_identical("d.qcow2", "qcow2", "model.raw", "raw");
}

INSTANTIATE_TEST_SUITE_P(Layouts, DataFileTest, ::testing::ValuesIn(layouts()),
                         [](const ::testing::TestParamInfo<Layout>& p) { return p.param.name; });

}  // namespace
}  // namespace uqcow::testing
