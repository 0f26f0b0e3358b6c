// Malformed images: valid qemu-img images with one field patched. The library
// (open_disk, then a read of the whole disk) must refuse each with an error
// that names the broken field, never crash or hang, and the CLI must print
// the same message as "uqcow: <message>" and exit 1.
//
// Every case first checks two premises, so that a pass means something:
// the unpatched image opens and reads cleanly, and QEMU itself refuses the
// patched image (qemu-img info, or qemu-img convert for damage that only a
// read finds).
//
// Field offsets are those of docs/interop/qcow2.txt ("Header").
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "block/options.h"
#include "tests/testutil.h"

namespace uqcow::testing {
namespace {

using namespace header_field;

constexpr uint32_t kFeatureTableExtension = 0x6803f857;
constexpr uint64_t kEntryOffsetMask = 0x00fffffffffffe00ull;  // L1 and standard L2 entries
constexpr uint64_t kCompressedFlag = 1ull << 62;

// The image every case starts from.
enum class Base { kPlain, kWithBacking, kWithSnapshot, kCompressedZlib, kCompressedZstd };

struct Malformed {
  std::string name;
  Base base;
  // Damages the image at `path`; returns "" or why it could not.
  std::function<std::string(const std::string& path)> patch;
  // Case-insensitive substrings the error must contain: the field's name.
  std::vector<std::string> expect;
  bool force_qcow2 = false;  // the damage makes the format probe say "raw"
  bool data_level = false;   // found by reading, not by opening
};

// Returns "" or what went wrong, with the commands run so far.
std::string build_base(Base base, const std::string& dir) {
  ImageBuilder b(dir);
  const uint64_t MiB = 1 << 20;
  switch (base) {
    case Base::kPlain:
    case Base::kWithSnapshot:
      b.create("img.qcow2", "qcow2", "", MiB);
      b.write("img.qcow2", "qcow2", {P(0, 128 << 10, 0x5a), P(700000, 5000, 0x5b)});
      if (base == Base::kWithSnapshot) b.run({"qemu-img", "snapshot", "-c", "s1", "img.qcow2"});
      break;
    case Base::kWithBacking:
      b.create("base.qcow2", "qcow2", "", MiB);
      b.write("base.qcow2", "qcow2", {P(0, MiB, 0x4a)});
      b.create("img.qcow2", "qcow2", "", 0, "base.qcow2", "qcow2");
      b.write("img.qcow2", "qcow2", {P(4096, 128 << 10, 0x5a)});
      break;
    case Base::kCompressedZlib:
    case Base::kCompressedZstd:
      b.create("src.raw", "raw", "", MiB);
      b.write("src.raw", "raw", {P(0, 200 << 10, 0x5a)});
      b.run({"qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
             base == Base::kCompressedZstd ? "compression_type=zstd" : "compression_type=zlib", "src.raw",
             "img.qcow2"});
      break;
  }
  return b.ok() ? "" : "building the base image failed:\n" + b.error() + "\nscript:\n" + b.script();
}

// ---- patches -----------------------------------------------------------------

std::function<std::string(const std::string&)> set32(uint64_t offset, uint32_t value) {
  return [=](const std::string& path) -> std::string {
    return patch_be32(path, offset, value) ? "" : "patch failed";
  };
}
// Adds `delta` to a 64-bit field (e.g. to misalign an offset).
std::function<std::string(const std::string&)> add64(uint64_t offset, uint64_t delta) {
  return [=](const std::string& path) -> std::string {
    auto v = peek_be64(path, offset);
    if (!v) return "cannot read the field";
    if (*v == 0) return "the field is 0 in the base image; the patch would not test anything";
    return patch_be64(path, offset, *v + delta) ? "" : "patch failed";
  };
}

// The host offset of the L2 table that L1[0] points at.
std::optional<uint64_t> l2_table_offset(const std::string& path) {
  auto l1 = peek_be64(path, kL1TableOffset);
  if (!l1) return std::nullopt;
  auto e = peek_be64(path, *l1);
  if (!e || !(*e & kEntryOffsetMask)) return std::nullopt;
  return *e & kEntryOffsetMask;
}

std::string misalign_l1_entry(const std::string& path) {
  auto l1 = peek_be64(path, kL1TableOffset);
  if (!l1) return "cannot read l1_table_offset";
  auto e = peek_be64(path, *l1);
  if (!e || !(*e & kEntryOffsetMask)) return "L1[0] is unallocated in the base image";
  return patch_be64(path, *l1, *e + 512) ? "" : "patch failed";
}

std::string misalign_l2_entry(const std::string& path) {
  auto l2 = l2_table_offset(path);
  if (!l2) return "no L2 table for L1[0]";
  auto e = peek_be64(path, *l2);
  if (!e || !(*e & kEntryOffsetMask) || (*e & kCompressedFlag)) return "L2[0] is not a standard data cluster";
  return patch_be64(path, *l2, *e + 512) ? "" : "patch failed";
}

std::string garble_compressed_cluster(const std::string& path) {
  auto bits = peek_be32(path, kClusterBits);
  auto l2 = l2_table_offset(path);
  if (!bits || !l2) return "no L2 table for L1[0]";
  auto e = peek_be64(path, *l2);
  if (!e || !(*e & kCompressedFlag)) return "L2[0] is not a compressed cluster";
  // Compressed cluster descriptor: the host offset is in bits 0..x-1 with
  // x = 62 - (cluster_bits - 8).
  const uint64_t host = *e & ((1ull << (62 - (*bits - 8))) - 1);
  // 0xff: for deflate a final block of the reserved type 3; for zstd a bad
  // magic number.
  std::vector<uint8_t> garbage(512, 0xff);
  return patch_file(path, host, garbage) ? "" : "patch failed";
}

// Finds the header extension of `type` (between header_length and the end of
// the first cluster); returns the offset of its 8-byte type/length header.
std::optional<uint64_t> find_extension(const std::string& path, uint32_t type) {
  auto hl = peek_be32(path, kHeaderLength);
  auto bits = peek_be32(path, kClusterBits);
  if (!hl || !bits) return std::nullopt;
  uint64_t pos = *hl;
  while (pos + 8 <= (1ull << *bits)) {
    auto t = peek_be32(path, pos);
    auto len = peek_be32(path, pos + 4);
    if (!t || !len || *t == 0) return std::nullopt;
    if (*t == type) return pos;
    pos += 8 + ((uint64_t{*len} + 7) & ~uint64_t{7});
  }
  return std::nullopt;
}

std::string extension_past_cluster(const std::string& path) {
  auto hl = peek_be32(path, kHeaderLength);
  if (!hl) return "cannot read header_length";
  auto type = peek_be32(path, *hl);
  if (!type || *type == 0) return "the base image has no header extension";
  return patch_be32(path, *hl + 4, 0x10000) ? "" : "patch failed";
}

std::string set_incompatible_bit(const std::string& path, int bit) {
  auto v = peek_be64(path, kIncompatibleFeatures);
  if (!v) return "cannot read incompatible_features";
  return patch_be64(path, kIncompatibleFeatures, *v | (1ull << bit)) ? "" : "patch failed";
}

// Renames one incompatible-feature entry of the feature name table to
// (bit 37, `name`) and sets bit 37: the error must quote that name.
std::string named_unknown_incompatible_bit(const std::string& path, const std::string& name) {
  auto ext = find_extension(path, kFeatureTableExtension);
  if (!ext) return "the base image has no feature name table";
  auto len = peek_be32(path, *ext + 4);
  if (!len || *len < 48) return "the feature name table is empty";
  uint8_t entry[48] = {};
  entry[0] = 0;   // incompatible
  entry[1] = 37;  // bit
  std::copy(name.begin(), name.end(), entry + 2);
  if (!patch_file(path, *ext + 8, entry)) return "patch failed";
  return set_incompatible_bit(path, 37);
}

std::vector<Malformed> all_cases() {
  return {
      {"bad_magic", Base::kPlain, set32(kMagic, 0x514649fa), {"magic"}, /*force_qcow2=*/true},
      {"version_1", Base::kPlain, set32(kVersion, 1), {"version"}},
      {"version_4", Base::kPlain, set32(kVersion, 4), {"version"}},
      {"cluster_bits_8", Base::kPlain, set32(kClusterBits, 8), {"cluster_bits"}},
      {"cluster_bits_22", Base::kPlain, set32(kClusterBits, 22), {"cluster_bits"}},
      // 32 MiB of L1 entries is QEMU's limit: one entry more.
      {"l1_size_huge", Base::kPlain, set32(kL1Size, (32u << 20) / 8 + 1), {"l1_size"}},
      // The 1 MiB base needs one L1 entry.
      {"l1_size_too_small_for_size", Base::kPlain, set32(kL1Size, 0), {"l1_size"}},
      {"l1_table_offset_misaligned", Base::kPlain, add64(kL1TableOffset, 512), {"l1_table_offset"}},
      {"refcount_table_offset_misaligned", Base::kPlain, add64(kRefcountTableOffset, 512),
       {"refcount_table_offset"}},
      {"refcount_table_clusters_huge", Base::kPlain, set32(kRefcountTableClusters, 0xffffff),
       {"refcount_table_clusters"}},
      {"refcount_table_clusters_0", Base::kPlain, set32(kRefcountTableClusters, 0), {"refcount_table_clusters"}},
      {"nb_snapshots_over_65536", Base::kPlain, set32(kNbSnapshots, 65537), {"nb_snapshots"}},
      {"snapshots_offset_misaligned", Base::kWithSnapshot, add64(kSnapshotsOffset, 8), {"snapshots_offset"}},
      {"header_length_below_104", Base::kPlain, set32(kHeaderLength, 100), {"header_length"}},
      {"header_length_over_cluster_size", Base::kPlain, set32(kHeaderLength, 65536 + 8), {"header_length"}},
      {"extension_runs_past_cluster", Base::kPlain, extension_past_cluster, {"extension"}},
      {"unknown_incompatible_bit", Base::kPlain,
       [](const std::string& p) { return set_incompatible_bit(p, 40); }, {"incompatible_features", "40"}},
      {"unknown_incompatible_bit_named", Base::kPlain,
       [](const std::string& p) { return named_unknown_incompatible_bit(p, "frobnication"); },
       {"incompatible_features", "frobnication"}},
      {"refcount_order_7", Base::kPlain, set32(kRefcountOrder, 7), {"refcount_order"}},
      {"crypt_method_3", Base::kPlain, set32(kCryptMethod, 3), {"crypt_method"}},
      {"backing_file_size_1024", Base::kWithBacking, set32(kBackingFileSize, 1024), {"backing_file_size"}},
      {"l1_entry_misaligned", Base::kPlain, misalign_l1_entry, {"L2 table offset"}, false, /*data_level=*/true},
      {"l2_entry_misaligned", Base::kPlain, misalign_l2_entry, {"L2 entry"}, false, true},
      {"compressed_garbage_zlib", Base::kCompressedZlib, garble_compressed_cluster, {"compressed"}, false, true},
      {"compressed_garbage_zstd", Base::kCompressedZstd, garble_compressed_cluster, {"compressed"}, false, true},
  };
}

void PrintTo(const Malformed& c, std::ostream* os) { *os << c.name; }

// open_disk + a read of the whole disk; returns the first error, or nullopt.
std::optional<Error> open_and_read_all(const std::string& path, bool force_qcow2) {
  OpenOptions options;
  if (force_qcow2) options.format = "qcow2";
  auto disk = SyncDisk::open(path, options);
  if (!disk.ok()) return disk.error();
  auto data = (*disk)->read_all();
  if (!data.ok()) return data.error();
  return std::nullopt;
}

class MalformedImage : public ::testing::TestWithParam<Malformed> {};

TEST_P(MalformedImage, LibraryAndCliRefuseItNamingTheField) {
  UQ_REQUIRE_TOOL("qemu-img");
  UQ_REQUIRE_TOOL("qemu-io");
  const Malformed& c = GetParam();
  TempDir dir(c.name);
  const std::string image = dir.file("img.qcow2");
  std::string built = build_base(c.base, dir.path());
  ASSERT_EQ(built, "");

  // Premise 1: the unpatched image is fine.
  auto before = open_and_read_all(image, c.force_qcow2);
  ASSERT_FALSE(before.has_value()) << "the unpatched base image already fails: " << before->message();

  ASSERT_EQ(c.patch(image), "") << "cannot apply the patch of " << c.name;

  // Premise 2: QEMU refuses the patched image too.
  const std::vector<std::string> qemu_check =
      c.data_level ? std::vector<std::string>{"qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, dir.file("qemu.raw")}
                   : std::vector<std::string>{"qemu-img", "info", "-f", "qcow2", image};
  CommandResult qemu = run_command(qemu_check);
  ASSERT_NE(qemu.exit_code, 0) << "QEMU accepts the patched image, so it does not test a refusal:\n"
                               << qemu.describe();

  // The library.
  auto error = open_and_read_all(image, c.force_qcow2);
  ASSERT_TRUE(error.has_value()) << "the library accepted the patched image and read all of it";
  EXPECT_NE(error->code(), 0);
  RecordProperty("library_error", error->message());
  for (const auto& field : c.expect) {
    EXPECT_TRUE(contains_icase(error->message(), field))
        << "the error does not name '" << field << "': " << error->message();
  }

  // The CLI: info checks the header; damage below it needs a read (convert).
  std::vector<std::string> args = c.data_level
                                      ? std::vector<std::string>{"convert", "-O", "raw", image, dir.file("uqcow.raw")}
                                      : std::vector<std::string>{"info"};
  if (!c.data_level) {
    if (c.force_qcow2) args.insert(args.end(), {"-f", "qcow2"});
    args.push_back(image);
  }
  CommandResult r = run_uqcow(args);
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_TRUE(r.err.starts_with("uqcow: ")) << r.describe();
  EXPECT_NE(r.err.find(error->message()), std::string::npos)
      << "stderr does not carry the library's message '" << error->message() << "':\n" << r.describe();
  for (const auto& field : c.expect) {
    EXPECT_TRUE(contains_icase(r.err, field)) << "stderr does not name '" << field << "':\n" << r.describe();
  }
}

INSTANTIATE_TEST_SUITE_P(Patched, MalformedImage, ::testing::ValuesIn(all_cases()),
                         [](const ::testing::TestParamInfo<Malformed>& info) { return info.param.name; });

}  // namespace
}  // namespace uqcow::testing
