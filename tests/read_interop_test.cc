// Read-path interoperability: images made at test time by qemu-img and
// qemu-io, read by uqcow, compared with what QEMU itself reads.
//
// For every case of the matrix (geometry, compat, refcount width, compression,
// preallocation, backing chains, extended L2, zero/discarded clusters,
// external data files, a 4 TiB sparse image, a dirty lazy-refcounts image,
// internal snapshots) the oracle is `qemu-img convert -O raw`, and:
// - CliConvert: `uqcow convert -O raw` writes the same bytes, and `uqcow
//   compare` finds the image identical to the oracle;
// - CliIo (the 4 TiB image, too big to copy): `uqcow io -r -c 'read -P'`
//   agrees with the oracle at every written range;
// - CliMap: `uqcow map --output=json` prints what qemu-img prints;
// - LibraryRead: Disk::read through open_disk() returns the same bytes for
//   the whole disk, for random ranges, and for reads issued concurrently;
// - LibraryReadTinyL2Cache: the same with an L2 cache of two 512-byte slices
//   that keeps evicting.
// Every failure message carries the commands that built the image, so it can
// be reproduced in a shell.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <ostream>
#include <memory>
#include <optional>
#include <random>
#include <regex>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "block/options.h"
#include "tests/testutil.h"

namespace uqcow::testing {
namespace {

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1024 * KiB;
constexpr uint64_t GiB = 1024 * MiB;
constexpr uint64_t TiB = 1024 * GiB;

std::string num(uint64_t v) { return std::to_string(v); }

// Writes at unaligned offsets, across cluster boundaries, at both ends of the
// disk, plus zeroed (with and without unmap) and discarded ranges over data.
// Patterns start at `first` and are all different, so data that lands at the
// wrong place shows.
std::vector<Write> standard_writes(uint64_t size, uint64_t cluster, unsigned first) {
  unsigned p = first;
  auto next = [&] {
    unsigned v = p++ & 0xff;
    return v ? v : p++ & 0xff;  // never 0x00: it would look like unwritten space
  };
  const uint64_t c = cluster;
  const uint64_t q = size / 4 / c * c;
  std::vector<Write> w = {
      P(1000, 3000, next()),
      P(c - std::min<uint64_t>(700, c / 2 - 5), 2 * c + 1400, next()),
      P(5 * c + 100, 100, next()),
      P(q, 5 * c, next()),
      Z(q + c, c),
      ZU(q + 2 * c, c),
      D(q + 3 * c, c),
      Z(q + 4 * c + 100, 1000),
      P(size / 2 - 333, std::min<uint64_t>(777777, size / 2 - 3 * c - 5000), next()),
      P(size / 2 + 3 * c + 4097, 65539, next()),
      P(size - 3000, 3000, next()),
  };
  return w;
}

struct ReadCase {
  std::string name;
  std::function<void(ImageBuilder&)> build;
  std::string image = "img.qcow2";  // relative to the case directory
  std::string snapshot;             // uqcow -l / OpenOptions::snapshot
  std::string qemu_snapshot;        // qemu-img convert -l
  // Checks that the built image is what the case claims (e.g. the dirty bit
  // is really set); returns "" or what is wrong.
  std::function<std::string(const std::string& image_path)> premise;
  // Too large to convert to raw twice: the CLI is checked with `uqcow io`
  // at the written ranges and the library against the (sparse) oracle file.
  bool huge = false;
};

std::string incompat_bit_set(const std::string& path, int bit, const char* what) {
  auto v = peek_be64(path, 72);
  if (!v) return "cannot read incompatible_features";
  if (!(*v >> bit & 1)) return std::string("incompatible feature '") + what + "' is not set";
  return "";
}

std::string has_compressed_clusters(const std::string& path) {
  CommandResult r = run_command({"qemu-img", "check", path});
  std::smatch m;
  static const std::regex re(R"(([0-9.]+)% compressed clusters)");
  if (!std::regex_search(r.out, m, re)) return "qemu-img check did not report compressed clusters:\n" + r.describe();
  if (std::stod(m[1].str()) <= 0) return "the image has no compressed clusters:\n" + r.out;
  return "";
}

// gtest prints parameters of failed tests: the name says it all.
void PrintTo(const ReadCase& c, std::ostream* os) { *os << c.name; }

// ---- the matrix ------------------------------------------------------------

std::string cluster_name(uint64_t c) {
  return c >= MiB ? num(c / MiB) + "M" : c >= KiB ? num(c / KiB) + "k" : num(c);
}

void add_geometry_cases(std::vector<ReadCase>& cases) {
  // Sizes that are not multiples of the cluster size.
  const std::pair<uint64_t, uint64_t> geometries[] = {
      {512, 3 * MiB + 1536}, {4 * KiB, 17 * MiB + 512}, {64 * KiB, 33 * MiB + 3584}, {2 * MiB, 41 * MiB + 512}};
  for (auto [c, size] : geometries) {
    for (const char* compat : {"0.10", "1.1"}) {
      ReadCase rc;
      rc.name = "cluster_" + cluster_name(c) + (std::string(compat) == "1.1" ? "_compat11" : "_compat010");
      rc.build = [c, size, compat](ImageBuilder& b) {
        b.create("img.qcow2", "qcow2", "cluster_size=" + num(c) + ",compat=" + compat, size);
        b.write("img.qcow2", "qcow2", standard_writes(size, c, 0x10));
      };
      cases.push_back(rc);
    }
  }
}

void add_refcount_cases(std::vector<ReadCase>& cases) {
  for (int bits : {1, 2, 4, 8, 16, 32, 64}) {
    ReadCase rc;
    rc.name = "refcount_bits_" + num(bits);
    rc.build = [bits](ImageBuilder& b) {
      const uint64_t size = 16 * MiB + 512;
      b.create("img.qcow2", "qcow2", "compat=1.1,refcount_bits=" + num(bits), size);
      b.write("img.qcow2", "qcow2", standard_writes(size, 64 * KiB, 0x20 + bits));
    };
    rc.premise = [bits](const std::string& path) -> std::string {
      auto order = peek_be32(path, 96);
      if (!order || (1u << *order) != static_cast<unsigned>(bits)) return "refcount_order does not match";
      return "";
    };
    cases.push_back(rc);
  }
}

void add_compressed_cases(std::vector<ReadCase>& cases) {
  struct C {
    const char* type;
    uint64_t cluster;
    const char* compat;
  };
  const C variants[] = {{"zlib", 512, "1.1"},      {"zlib", 64 * KiB, "1.1"}, {"zlib", 2 * MiB, "1.1"},
                        {"zlib", 64 * KiB, "0.10"}, {"zstd", 4 * KiB, "1.1"}, {"zstd", 64 * KiB, "1.1"},
                        {"zstd", 2 * MiB, "1.1"}};
  for (const C& v : variants) {
    ReadCase rc;
    rc.name = std::string("compressed_") + v.type + "_" + cluster_name(v.cluster) +
              (std::string(v.compat) == "1.1" ? "" : "_compat010");
    rc.build = [v](ImageBuilder& b) {
      const uint64_t c = v.cluster;
      const uint64_t size = std::max<uint64_t>(6 * MiB, 10 * c) + 512;
      b.create("src.raw", "raw", "", size);
      // Compressible patterns, then incompressible bytes (qemu stores those
      // clusters uncompressed), then untouched zeros.
      b.write("src.raw", "raw",
              {P(0, 3 * c + 1000, 0x31), P(size / 2 + 77, 2 * c, 0x32), P(size - 4096, 4096, 0x33)});
      b.random_bytes("src.raw", size / 3 + 123, 3 * c + 777, 42);
      std::string opts = std::string("cluster_size=") + num(c) + ",compat=" + v.compat;
      if (std::string(v.type) == "zstd") opts += ",compression_type=zstd";
      b.run({"qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, "src.raw", "img.qcow2"});
    };
    rc.premise = [v](const std::string& path) -> std::string {
      if (std::string(v.type) == "zstd") {
        if (auto e = incompat_bit_set(path, 3, "compression type"); !e.empty()) return e;
      }
      return has_compressed_clusters(path);
    };
    cases.push_back(rc);
  }
}

void add_preallocation_cases(std::vector<ReadCase>& cases) {
  for (const char* mode : {"off", "metadata", "falloc", "full"}) {
    for (const char* compat : {"0.10", "1.1"}) {
      ReadCase rc;
      rc.name = std::string("prealloc_") + mode + (std::string(compat) == "1.1" ? "_compat11" : "_compat010");
      rc.build = [mode, compat](ImageBuilder& b) {
        const uint64_t size = 8 * MiB + 512;
        b.create("img.qcow2", "qcow2", std::string("preallocation=") + mode + ",compat=" + compat, size);
        b.write("img.qcow2", "qcow2", standard_writes(size, 64 * KiB, 0x40));
      };
      cases.push_back(rc);
    }
  }
}

void add_backing_cases(std::vector<ReadCase>& cases) {
  // All backing names are relative and the images are created from inside
  // the case directory; uqcow runs from elsewhere, so it must resolve them
  // against the image's directory.
  {
    ReadCase rc;
    rc.name = "backing1_qcow2";
    rc.build = [](ImageBuilder& b) {
      const uint64_t size = 16 * MiB;
      b.create("base.qcow2", "qcow2", "cluster_size=64k", size);
      b.write("base.qcow2", "qcow2", {P(0, 4 * MiB, 0xa1), P(6 * MiB + 333, 3 * MiB, 0xa2), P(size - 5000, 5000, 0xa3)});
      b.create("img.qcow2", "qcow2", "", 0, "base.qcow2", "qcow2");
      b.write("img.qcow2", "qcow2", standard_writes(size, 64 * KiB, 0x10));
    };
    cases.push_back(rc);
  }
  {
    ReadCase rc;
    rc.name = "backing1_raw";
    rc.build = [](ImageBuilder& b) {
      const uint64_t size = 16 * MiB;
      b.create("base.raw", "raw", "", size);
      b.write("base.raw", "raw", {P(0, 4 * MiB, 0xa1), P(6 * MiB + 333, 3 * MiB, 0xa2), P(size - 5000, 5000, 0xa3)});
      b.create("img.qcow2", "qcow2", "cluster_size=4k", 0, "base.raw", "raw");
      b.write("img.qcow2", "qcow2", standard_writes(size, 4 * KiB, 0x10));
    };
    cases.push_back(rc);
  }
  for (const char* base_format : {"qcow2", "raw"}) {
    ReadCase rc;
    rc.name = std::string("backing3_") + base_format + "_base";
    rc.build = [base_format](ImageBuilder& b) {
      const uint64_t size = 24 * MiB;
      const std::string base = std::string("base.") + base_format;
      // Each layer has its own cluster size, and each writes over the data of
      // the layers below: patterns, zeros (which must hide the backing data)
      // and discards.
      b.create(base, base_format, std::string(base_format) == "qcow2" ? "cluster_size=4k" : "", size);
      b.write(base, base_format, {P(0, 20 * MiB, 0xb1), P(22 * MiB + 1, 2 * MiB - 1, 0xb2)});
      b.create("mid1.qcow2", "qcow2", "cluster_size=64k,compat=0.10", 0, base, base_format);
      b.write("mid1.qcow2", "qcow2",
              {P(1 * MiB + 4097, 3 * MiB, 0xc1), Z(8 * MiB, 1 * MiB), P(23 * MiB + 5, 100000, 0xc2)});
      b.create("mid2.qcow2", "qcow2", "cluster_size=512", 0, "mid1.qcow2", "qcow2");
      b.write("mid2.qcow2", "qcow2",
              {P(2 * MiB + 511, 1 * MiB, 0xd1), Z(4 * MiB + 512, 64 * KiB), ZU(12 * MiB, 1 * MiB),
               D(14 * MiB, 256 * KiB), P(8 * MiB + 4 * KiB, 8 * KiB, 0xd2)});
      b.create("img.qcow2", "qcow2", "cluster_size=2M", 0, "mid2.qcow2", "qcow2");
      b.write("img.qcow2", "qcow2", standard_writes(size, 2 * MiB, 0xe0));
    };
    cases.push_back(rc);
  }
  {
    // A raw backing file of an odd length (not a multiple of 512), shorter
    // than the overlay: past its end the disk reads zeros, including in the
    // overlay cluster that straddles the end.
    ReadCase rc;
    rc.name = "backing_shorter_raw";
    rc.build = [](ImageBuilder& b) {
      const uint64_t base_size = 5 * MiB + 1000;
      b.create("base.raw", "raw", "", 5 * MiB + 4096);
      b.write("base.raw", "raw", {P(0, 64 * KiB, 0xa1), P(5 * MiB - 4096, 8192, 0xa2)});
      b.run({"truncate", "-s", num(base_size), "base.raw"});
      b.create("img.qcow2", "qcow2", "", 12 * MiB, "base.raw", "raw");
      b.write("img.qcow2", "qcow2",
              {P(5 * MiB + 3000, 100, 0x51), P(5 * MiB - 2000, 1500, 0x52), P(7 * MiB, 4096, 0x53)});
    };
    cases.push_back(rc);
  }
  {
    ReadCase rc;
    rc.name = "backing_shorter_qcow2";
    rc.build = [](ImageBuilder& b) {
      const uint64_t base_size = 4 * MiB + 512;
      b.create("base.qcow2", "qcow2", "", base_size);
      b.write("base.qcow2", "qcow2", {P(base_size - 70000, 70000, 0xa1), P(100, 200, 0xa2)});
      b.create("img.qcow2", "qcow2", "cluster_size=4k", 12 * MiB + 512, "base.qcow2", "qcow2");
      b.write("img.qcow2", "qcow2", {P(4 * MiB - 100, 300, 0x61), P(9 * MiB + 1, 10, 0x62)});
    };
    cases.push_back(rc);
  }
  {
    // Relative names with "..", per layer: images/img.qcow2 -> ../base/mid.qcow2
    // -> base.raw (relative to base/, not to images/ or the cwd).
    ReadCase rc;
    rc.name = "backing_relative_subdirs";
    rc.image = "images/img.qcow2";
    rc.build = [](ImageBuilder& b) {
      const uint64_t size = 8 * MiB;
      b.mkdir("base");
      b.mkdir("images");
      b.create("base/base.raw", "raw", "", size);
      b.write("base/base.raw", "raw", {P(0, size, 0xa5)});
      b.create("base/mid.qcow2", "qcow2", "", 0, "base.raw", "raw");
      b.write("base/mid.qcow2", "qcow2", {P(1 * MiB + 7, 1 * MiB, 0xb5)});
      b.create("images/img.qcow2", "qcow2", "", 0, "../base/mid.qcow2", "qcow2");
      b.write("images/img.qcow2", "qcow2", {P(1 * MiB + 512 * KiB + 3, 2 * MiB, 0xc5), Z(5 * MiB, 64 * KiB)});
    };
    cases.push_back(rc);
  }
  {
    // Zero clusters in an overlay must read as zeros, not as backing data;
    // discarded overlay clusters are decided by the oracle.
    ReadCase rc;
    rc.name = "zero_over_backing";
    rc.build = [](ImageBuilder& b) {
      const uint64_t size = 4 * MiB;
      b.create("base.qcow2", "qcow2", "", size);
      b.write("base.qcow2", "qcow2", {P(0, size, 0xd0)});
      b.create("img.qcow2", "qcow2", "", 0, "base.qcow2", "qcow2");
      b.write("img.qcow2", "qcow2",
              {P(0, 1 * MiB, 0x71), Z(64 * KiB, 128 * KiB), ZU(256 * KiB, 64 * KiB), Z(400000, 5000),
               D(512 * KiB, 64 * KiB), D(700000, 1000), Z(2 * MiB, 1 * MiB), ZU(3 * MiB + 64 * KiB, 128 * KiB)});
    };
    cases.push_back(rc);
  }
}

void add_extended_l2_cases(std::vector<ReadCase>& cases) {
  {
    // 64k clusters, 2k subclusters, over a backing file: subcluster writes
    // leave the rest of the cluster to the backing file.
    ReadCase rc;
    rc.name = "extended_l2_over_backing";
    rc.build = [](ImageBuilder& b) {
      b.create("base.qcow2", "qcow2", "cluster_size=64k", 4 * MiB);
      b.write("base.qcow2", "qcow2", {P(0, 1 * MiB, 0xb0), P(1 * MiB, 1 * MiB, 0xb1)});
      b.create("img.qcow2", "qcow2", "extended_l2=on,cluster_size=64k", 4 * MiB, "base.qcow2", "qcow2");
      b.write("img.qcow2", "qcow2",
              {P(4 * KiB, 4 * KiB, 0x51),           // subclusters 2-3 of cluster 0
               P(70000, 1000, 0x52),                // inside one subcluster of cluster 1
               Z(128 * KiB + 6 * KiB, 4 * KiB),     // zero subclusters 3-4 of cluster 2
               ZU(192 * KiB + 4 * KiB, 2 * KiB),    // zero subcluster 2 of cluster 3
               D(256 * KiB + 2 * KiB, 2 * KiB),     // discard subcluster 1 of cluster 4
               P(1 * MiB - 1000, 3000, 0x53),       // across the backing patterns
               P(3 * MiB, 64 * KiB, 0x54),          // a whole cluster past the backing data
               Z(320 * KiB, 64 * KiB),              // a whole zero cluster
               P(2 * MiB + 2 * KiB + 1, 2 * KiB, 0x55)});
    };
    rc.premise = [](const std::string& path) { return incompat_bit_set(path, 4, "extended L2"); };
    cases.push_back(rc);
  }
  const std::pair<uint64_t, uint64_t> geometries[] = {
      {16 * KiB, 4 * MiB + 512}, {32 * KiB, 8 * MiB + 512}, {2 * MiB, 20 * MiB + 512}};
  for (auto [c, size] : geometries) {
    ReadCase rc;
    rc.name = "extended_l2_" + cluster_name(c);
    rc.build = [c, size](ImageBuilder& b) {
      b.create("img.qcow2", "qcow2", "extended_l2=on,cluster_size=" + num(c), size);
      std::vector<Write> w = standard_writes(size, c, 0x60);
      const uint64_t sc = c / 32;
      w.push_back(P(8 * c + 3 * sc + 17, sc, 0x7a));
      w.push_back(Z(8 * c + 5 * sc, 2 * sc));
      b.write("img.qcow2", "qcow2", w);
    };
    rc.premise = [](const std::string& path) { return incompat_bit_set(path, 4, "extended L2"); };
    cases.push_back(rc);
  }
}

void add_zero_and_discard_cases(std::vector<ReadCase>& cases) {
  for (const char* compat : {"0.10", "1.1"}) {
    ReadCase rc;
    rc.name = std::string("zero_and_discard") + (std::string(compat) == "1.1" ? "_compat11" : "_compat010");
    rc.build = [compat](ImageBuilder& b) {
      b.create("img.qcow2", "qcow2", std::string("compat=") + compat, 8 * MiB);
      b.write("img.qcow2", "qcow2",
              {P(0, 8 * MiB, 0xe1), Z(1 * MiB, 3 * MiB), ZU(5 * MiB, 1 * MiB), D(6 * MiB + 64 * KiB, 512 * KiB),
               Z(7 * MiB + 100, 200), D(7 * MiB + 4096, 512)});
    };
    cases.push_back(rc);
  }
}

void add_data_file_cases(std::vector<ReadCase>& cases) {
  for (bool raw : {false, true}) {
    ReadCase rc;
    rc.name = raw ? "data_file_raw" : "data_file";
    rc.build = [raw](ImageBuilder& b) {
      const uint64_t size = 16 * MiB;
      b.create("img.qcow2", "qcow2", std::string("data_file=img.data") + (raw ? ",data_file_raw=on" : ""), size);
      b.write("img.qcow2", "qcow2", standard_writes(size, 64 * KiB, 0x90));
    };
    rc.premise = [raw](const std::string& path) -> std::string {
      if (auto e = incompat_bit_set(path, 2, "external data file"); !e.empty()) return e;
      auto autoclear = peek_be64(path, 88);
      if (raw && (!autoclear || !(*autoclear & 2))) return "data_file_raw is not set";
      return "";
    };
    cases.push_back(rc);
  }
}

void add_special_cases(std::vector<ReadCase>& cases) {
  {
    ReadCase rc;
    rc.name = "sparse_4TiB";
    rc.huge = true;
    rc.build = [](ImageBuilder& b) {
      b.create("img.qcow2", "qcow2", "", 4 * TiB);
      b.write("img.qcow2", "qcow2",
              {P(512, 1000, 0x11), P(1 * TiB + 12346, 70000, 0x22), P(2 * TiB - 4096 - 7, 20000, 0x33),
               P(3 * TiB + 5 * GiB + 511, 513, 0x55), P(4 * TiB - 5000, 5000, 0x44)});
    };
    cases.push_back(rc);
  }
  {
    // Left dirty by a crash: the refcounts are stale, the data is not. A
    // read-only open must not try to repair, and must read the data.
    ReadCase rc;
    rc.name = "lazy_refcounts_dirty";
    rc.build = [](ImageBuilder& b) {
      b.create("img.qcow2", "qcow2", "lazy_refcounts=on", 16 * MiB);
      b.write("img.qcow2", "qcow2", {P(0, 64 * KiB, 0x11), P(100000, 5000, 0x12)}, {"abort"},
              /*expect_failure=*/true);
    };
    rc.premise = [](const std::string& path) { return incompat_bit_set(path, 0, "dirty"); };
    cases.push_back(rc);
  }
  {
    ReadCase rc;
    rc.name = "raw_image";
    rc.image = "img.raw";
    rc.build = [](ImageBuilder& b) {
      const uint64_t size = 5 * MiB + 512;
      b.create("img.raw", "raw", "", size);
      b.write("img.raw", "raw", standard_writes(size, 64 * KiB, 0x30));
    };
    cases.push_back(rc);
  }
}

// Internal snapshots: three states of one image, each read by name or id.
void build_snapshots(ImageBuilder& b, bool resize_after) {
  b.create("img.qcow2", "qcow2", "", 8 * MiB);
  b.write("img.qcow2", "qcow2", {P(0, 1 * MiB, 0x71), P(3 * MiB + 5, 70000, 0x72), P(8 * MiB - 777, 777, 0x76)});
  b.run({"qemu-img", "snapshot", "-c", "first", "img.qcow2"});
  b.write("img.qcow2", "qcow2", {P(512 * KiB + 1, 1 * MiB, 0x73), Z(3 * MiB, 64 * KiB), D(0, 64 * KiB)});
  b.run({"qemu-img", "snapshot", "-c", "second", "img.qcow2"});
  b.write("img.qcow2", "qcow2", {P(0, 64 * KiB, 0x74), P(5 * MiB + 3, 100, 0x75)});
  if (resize_after) {
    b.run({"qemu-img", "resize", "-q", "img.qcow2", num(12 * MiB)});
    b.write("img.qcow2", "qcow2", {P(10 * MiB, 4096, 0x77)});
  }
}

void add_snapshot_cases(std::vector<ReadCase>& cases) {
  struct S {
    const char* name;
    const char* uqcow;
    const char* qemu;
    bool resize;
  };
  const S variants[] = {{"snapshot_first", "first", "snapshot.name=first", false},
                        {"snapshot_second", "second", "snapshot.name=second", false},
                        {"snapshot_by_id", "1", "snapshot.id=1", false},
                        {"snapshot_active_layer", "", "", false},
                        // The image grew after the snapshot was taken.
                        {"snapshot_before_resize", "first", "snapshot.name=first", true}};
  for (const S& v : variants) {
    ReadCase rc;
    rc.name = v.name;
    rc.snapshot = v.uqcow;
    rc.qemu_snapshot = v.qemu;
    rc.build = [v](ImageBuilder& b) { build_snapshots(b, v.resize); };
    cases.push_back(rc);
  }
}

std::vector<ReadCase> all_cases() {
  std::vector<ReadCase> cases;
  add_geometry_cases(cases);
  add_refcount_cases(cases);
  add_compressed_cases(cases);
  add_preallocation_cases(cases);
  add_backing_cases(cases);
  add_extended_l2_cases(cases);
  add_zero_and_discard_cases(cases);
  add_data_file_cases(cases);
  add_special_cases(cases);
  add_snapshot_cases(cases);
  return cases;
}

// ---- the fixture -------------------------------------------------------------

// Reads `len` bytes at `offset` of a file with pread (holes read as zeros).
std::vector<uint8_t> pread_file(const std::string& path, uint64_t offset, size_t len) {
  std::vector<uint8_t> out(len, 0);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::pread(fd, out.data() + done, len - done, static_cast<off_t>(offset + done));
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  return out;
}

class ReadInterop : public ::testing::TestWithParam<ReadCase> {
 protected:
  void SetUp() override {
    if (!require_tool("qemu-img") || !require_tool("qemu-io")) return;
    const ReadCase& c = GetParam();
    dir_ = std::make_unique<TempDir>(c.name);
    builder_ = std::make_unique<ImageBuilder>(dir_->path());
    c.build(*builder_);
    ASSERT_TRUE(builder_->ok()) << "building the image failed:\n" << builder_->error() << "\nscript:\n"
                                << builder_->script();
    image_ = dir_->file(c.image);
    if (c.premise) {
      std::string wrong = c.premise(image_);
      ASSERT_EQ(wrong, "") << "the image does not have the property this case tests:\n" << builder_->script();
    }
    // The oracle.
    reference_ = dir_->file("qemu.raw");
    std::vector<std::string> argv{"qemu-img", "convert"};
    if (!c.qemu_snapshot.empty()) argv.insert(argv.end(), {"-l", c.qemu_snapshot});
    argv.insert(argv.end(), {"-O", "raw", image_, reference_});
    // From the case directory: QEMU 7.2 resolves a relative data_file name
    // against its working directory (backing names against the image's).
    CommandResult r = run_command(argv, dir_->path());
    ASSERT_TRUE(Succeeded(r)) << builder_->script();
    script_ = builder_->script() + r.command + "\n";
  }

  // The oracle's bytes for [offset, offset + len).
  std::vector<uint8_t> expected(uint64_t offset, size_t len) {
    if (reference_bytes_) {
      return std::vector<uint8_t>(reference_bytes_->begin() + static_cast<ptrdiff_t>(offset),
                                  reference_bytes_->begin() + static_cast<ptrdiff_t>(offset + len));
    }
    return pread_file(reference_, offset, len);
  }

  uint64_t reference_size() const { return std::filesystem::file_size(reference_); }

  // Random (offset, length) pairs within `size`: uniform, at cluster
  // boundaries, at the edges of written ranges, and at the end of the disk.
  std::vector<std::pair<uint64_t, size_t>> random_ranges(uint64_t size, size_t count, uint32_t seed,
                                                         size_t max_len) {
    std::mt19937_64 rng(seed);
    auto below = [&](uint64_t n) { return n ? rng() % n : 0; };
    const auto& hot = builder_->written();
    std::vector<std::pair<uint64_t, size_t>> out;
    for (size_t i = 0; i < count; ++i) {
      uint64_t off = 0;
      switch (i % 4) {
        case 0: off = below(size); break;
        case 1: {
          uint64_t grain = uint64_t{512} << below(13);  // 512 .. 2M
          off = below(size / grain + 1) * grain;
          off = off + below(7) - 3;
          break;
        }
        case 2: {
          if (hot.empty()) { off = below(size); break; }
          const auto& [start, len] = hot[below(hot.size())];
          uint64_t edge = below(2) ? start : start + len;
          off = edge + below(8193) - 4096;
          break;
        }
        case 3: off = size - 1 - below(std::min<uint64_t>(size, 3 * max_len)); break;
      }
      if (off >= size) off = below(size);
      size_t len = 1 + below(std::min<uint64_t>(max_len, size - off));
      out.emplace_back(off, len);
    }
    return out;
  }

  std::unique_ptr<TempDir> dir_;
  std::unique_ptr<ImageBuilder> builder_;
  std::string image_;
  std::string reference_;
  std::string script_;
  std::optional<std::vector<uint8_t>> reference_bytes_;
};

uint32_t seed_of(const std::string& name) {
  return static_cast<uint32_t>(std::hash<std::string>{}(name) & 0xffffffff);
}

std::vector<ReadCase> cases_where(const std::function<bool(const ReadCase&)>& keep) {
  std::vector<ReadCase> out;
  for (auto& c : all_cases()) {
    if (keep(c)) out.push_back(std::move(c));
  }
  return out;
}

std::string case_name(const ::testing::TestParamInfo<ReadCase>& info) { return info.param.name; }

// `uqcow convert [-l SNAP] -O raw` writes what `qemu-img convert` writes, and
// `uqcow compare` finds the image identical to qemu's raw copy.
class CliConvert : public ReadInterop {};

TEST_P(CliConvert, MatchesQemu) {
  const ReadCase& c = GetParam();
  SCOPED_TRACE("image built by:\n" + script_);
  const std::string out = dir_->file("uqcow.raw");
  std::vector<std::string> args{"convert"};
  if (!c.snapshot.empty()) args.insert(args.end(), {"-l", c.snapshot});
  args.insert(args.end(), {"-O", "raw", image_, out});
  CommandResult r = run_uqcow(args);
  ASSERT_TRUE(Succeeded(r));
  auto got = read_file(out);
  auto want = read_file(reference_);
  ASSERT_TRUE(got.has_value()) << "cannot read " << out;
  ASSERT_TRUE(want.has_value());
  EXPECT_TRUE(SameBytes(*got, *want)) << r.command << "\nvs qemu-img convert";

  if (c.snapshot.empty()) {
    CommandResult cmp = run_uqcow({"compare", image_, reference_});
    EXPECT_EQ(cmp.exit_code, 0) << "uqcow compare must find the image identical to qemu's raw copy:\n"
                                << cmp.describe();
  }
}

INSTANTIATE_TEST_SUITE_P(Matrix, CliConvert, ::testing::ValuesIn(cases_where([](const ReadCase& c) {
                           return !c.huge;
                         })),
                         case_name);

// A raw copy of 4 TiB is not something to write twice: `uqcow io -r` checks
// every written range with read -P (the pattern comes from the oracle) and
// an unwritten range far from any data, and reports a wrong pattern.
class CliIo : public ReadInterop {};

TEST_P(CliIo, ReadPatternMatchesQemuAtTheWrittenRanges) {
  SCOPED_TRACE("image built by:\n" + script_);
  const auto& hot = builder_->written();
  ASSERT_FALSE(hot.empty());
  std::vector<std::string> args{"io", "-r"};
  for (const auto& [off, len] : hot) {
    char cmd[96];
    std::snprintf(cmd, sizeof cmd, "read -P 0x%02x %" PRIu64 " %" PRIu64, expected(off, 1)[0], off, len);
    args.insert(args.end(), {"-c", cmd});
  }
  args.insert(args.end(), {"-c", "read -P 0 " + num(2 * TiB + 4 * GiB) + " 65536"});
  args.push_back(image_);
  EXPECT_TRUE(Succeeded(run_uqcow(args)));

  const auto& [off, len] = hot[1];
  const unsigned wrong = expected(off, 1)[0] ^ 0xff;
  char cmd[96];
  std::snprintf(cmd, sizeof cmd, "read -P 0x%02x %" PRIu64 " %" PRIu64, wrong, off, len);
  CommandResult r = run_uqcow({"io", "-r", "-c", cmd, image_});
  EXPECT_NE(r.exit_code, 0) << "read -P with the wrong pattern must fail:\n" << r.describe();
}

INSTANTIATE_TEST_SUITE_P(Matrix, CliIo, ::testing::ValuesIn(cases_where([](const ReadCase& c) {
                           return c.huge;
                         })),
                         case_name);

// `uqcow map --output=json` prints what `qemu-img map --output=json` prints
// (map has no snapshot option: snapshot cases are left out).
class CliMap : public ReadInterop {};

TEST_P(CliMap, MatchesQemu) {
  SCOPED_TRACE("image built by:\n" + script_);
  // qemu from the case directory, for its reading of relative data_file names.
  CommandResult qemu = run_command({"qemu-img", "map", "--output=json", image_}, dir_->path());
  ASSERT_TRUE(Succeeded(qemu));
  CommandResult ours = run_uqcow({"map", "--output=json", image_});
  ASSERT_TRUE(Succeeded(ours));
  EXPECT_EQ(ours.out, qemu.out);
}

INSTANTIATE_TEST_SUITE_P(Matrix, CliMap, ::testing::ValuesIn(cases_where([](const ReadCase& c) {
                           return c.snapshot.empty() && c.qemu_snapshot.empty();
                         })),
                         case_name);

// Disk::read through open_disk(): the whole disk, random ranges, and many
// reads in flight at once, all compared with qemu's raw copy.
class LibraryRead : public ReadInterop {
 protected:
  void check_random_and_concurrent_reads(SyncDisk& disk, uint32_t seed, size_t count, size_t max_len,
                                         size_t concurrent) {
    const uint64_t size = disk.size();
    SCOPED_TRACE("random ranges from std::mt19937_64(" + num(seed) + ")");
    for (const auto& [off, len] : random_ranges(size, count, seed, max_len)) {
      std::vector<uint8_t> buf(len, 0xee);
      Status s = disk.read(off, buf);
      ASSERT_TRUE(s.ok()) << "read " << len << " at " << off << ": " << s.message();
      ASSERT_TRUE(SameBytes(buf, expected(off, len), off)) << "read " << len << " at " << off;
    }
    // The lock-free hot path and the L2 cache see interleaved misses.
    auto ranges = random_ranges(size, concurrent, seed + 1, 256 * KiB);
    std::vector<std::vector<uint8_t>> bufs;
    std::vector<std::pair<uint64_t, std::span<uint8_t>>> reqs;
    bufs.reserve(ranges.size());
    for (const auto& [off, len] : ranges) {
      bufs.emplace_back(len, 0xee);
      reqs.emplace_back(off, bufs.back());
    }
    std::vector<Status> results = disk.read_concurrently(reqs);
    ASSERT_EQ(results.size(), ranges.size());
    for (size_t i = 0; i < ranges.size(); ++i) {
      const auto& [off, len] = ranges[i];
      ASSERT_TRUE(results[i].ok()) << "concurrent read " << len << " at " << off << ": " << results[i].message();
      EXPECT_TRUE(SameBytes(bufs[i], expected(off, len), off)) << "concurrent read " << len << " at " << off;
    }
  }
};

TEST_P(LibraryRead, MatchesQemu) {
  const ReadCase& c = GetParam();
  SCOPED_TRACE("image built by:\n" + script_);
  if (!c.huge) {
    reference_bytes_ = read_file(reference_);
    ASSERT_TRUE(reference_bytes_.has_value());
  }
  OpenOptions options;
  options.snapshot = c.snapshot;
  auto disk = SyncDisk::open(image_, options);
  ASSERT_TRUE(disk.ok()) << disk.error().message();
  ASSERT_EQ((*disk)->size(), reference_size()) << "guest size differs from qemu-img convert's output";

  if (!c.huge) {
    SCOPED_TRACE("whole-disk read in 1 MiB + 4097 byte chunks");
    auto all = (*disk)->read_all();
    ASSERT_TRUE(all.ok()) << all.error().message();
    EXPECT_TRUE(SameBytes(*all, *reference_bytes_));
  }
  ASSERT_NO_FATAL_FAILURE(check_random_and_concurrent_reads(**disk, seed_of(c.name), 300, 4 * MiB, 64));
  Status s = (*disk)->close();
  EXPECT_TRUE(s.ok()) << s.message();
}

INSTANTIATE_TEST_SUITE_P(Matrix, LibraryRead, ::testing::ValuesIn(all_cases()), case_name);

// The same with an L2 cache of two 512-byte slices: nearly every request
// misses and evicts, and concurrent requests outnumber the cache entries.
class LibraryReadTinyL2Cache : public LibraryRead {};

TEST_P(LibraryReadTinyL2Cache, MatchesQemu) {
  const ReadCase& c = GetParam();
  SCOPED_TRACE("image built by:\n" + script_);
  if (!c.huge) {
    reference_bytes_ = read_file(reference_);
    ASSERT_TRUE(reference_bytes_.has_value());
  }
  OpenOptions options;
  options.snapshot = c.snapshot;
  options.l2_cache_entry_size = 512;
  options.l2_cache_size = 1024;
  auto disk = SyncDisk::open(image_, options);
  ASSERT_TRUE(disk.ok()) << disk.error().message();
  ASSERT_EQ((*disk)->size(), reference_size()) << "guest size differs from qemu-img convert's output";
  ASSERT_NO_FATAL_FAILURE(check_random_and_concurrent_reads(**disk, seed_of(c.name) ^ 0x5a5a5a5a, 150, 1 * MiB, 32));
}

// Raw images have no L2 cache.
INSTANTIATE_TEST_SUITE_P(Matrix, LibraryReadTinyL2Cache, ::testing::ValuesIn(cases_where([](const ReadCase& c) {
                           return !c.image.ends_with(".raw");
                         })),
                         case_name);

// ---- edges of the Disk contract ---------------------------------------------

class ReadEdges : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!require_tool("qemu-img") || !require_tool("qemu-io")) return;
    ImageBuilder b(dir_.path());
    b.create("img.qcow2", "qcow2", "", 1 * MiB + 512);
    b.write("img.qcow2", "qcow2", {P(1 * MiB - 100, 612, 0x42)});
    b.run({"qemu-img", "snapshot", "-c", "snap", "img.qcow2"});
    ASSERT_TRUE(b.ok()) << b.error();
    image_ = dir_.file("img.qcow2");
  }
  TempDir dir_{"edges"};
  std::string image_;
};

TEST_F(ReadEdges, ReadsBeyondTheEndAreEinvalAndTheLastByteReads) {
  auto disk = SyncDisk::open(image_);
  ASSERT_TRUE(disk.ok()) << disk.error().message();
  const uint64_t size = (*disk)->size();
  ASSERT_EQ(size, 1 * MiB + 512);
  std::vector<uint8_t> one(1);
  ASSERT_TRUE((*disk)->read(size - 1, one).ok());
  EXPECT_EQ(one[0], 0x42);
  std::vector<uint8_t> none;
  EXPECT_TRUE((*disk)->read(size, none).ok()) << "an empty read at the end is within the disk";
  std::vector<uint8_t> two(2);
  Status s = (*disk)->read(size - 1, two);
  EXPECT_EQ(s.code(), EINVAL) << s.message();
  s = (*disk)->read(UINT64_MAX - 1, two);
  EXPECT_EQ(s.code(), EINVAL) << "offset + length overflows: " << s.message();
}

TEST_F(ReadEdges, UnknownSnapshotIsAnErrorNamingIt) {
  OpenOptions options;
  options.snapshot = "no-such-snapshot";
  auto disk = SyncDisk::open(image_, options);
  ASSERT_FALSE(disk.ok());
  EXPECT_TRUE(contains_icase(disk.error().message(), "no-such-snapshot")) << disk.error().message();

  CommandResult r = run_uqcow({"convert", "-l", "no-such-snapshot", "-O", "raw", image_, dir_.file("out.raw")});
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_TRUE(r.err.starts_with("uqcow: ")) << r.describe();
  EXPECT_TRUE(contains_icase(r.err, "no-such-snapshot")) << r.describe();
}

TEST_F(ReadEdges, CompareReportsADifferenceWithExitCode1) {
  const std::string reference = dir_.file("ref.raw");
  ASSERT_TRUE(Succeeded(run_command({"qemu-img", "convert", "-O", "raw", image_, reference})));
  CommandResult same = run_uqcow({"compare", image_, reference});
  EXPECT_EQ(same.exit_code, 0) << same.describe();
  // One byte changed in the middle of the written range.
  const uint8_t changed[] = {0x43};
  ASSERT_TRUE(patch_file(reference, 1 * MiB + 7, changed));
  CommandResult differ = run_uqcow({"compare", image_, reference});
  EXPECT_EQ(differ.exit_code, 1) << differ.describe();
  CommandResult missing = run_uqcow({"compare", image_, dir_.file("missing.raw")});
  EXPECT_EQ(missing.exit_code, 2) << missing.describe();
  EXPECT_TRUE(missing.err.starts_with("uqcow: ")) << missing.describe();
}

}  // namespace
}  // namespace uqcow::testing
