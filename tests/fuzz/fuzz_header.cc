// Fuzz target: the qcow2 header and its extensions (parse_header), and the
// snapshot table parser fed with the bytes after the first cluster.
//
// Property beyond "no crash, no sanitizer report": a header that parses
// serialises (when it fits in one cluster) to bytes that parse back to the
// same header, as a rewrite by uqcow (resize, snapshot, clearing dirty bits)
// must keep every field it does not mean to change.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>

#include "qcow2/header.h"
#include "qcow2/snapshot.h"

namespace {

using uqcow::qcow2::Header;

#define FUZZ_EXPECT(cond)                                                          \
  do {                                                                             \
    if (!(cond)) {                                                                 \
      std::fprintf(stderr, "uqcow fuzz_header: round trip broke: %s\n", #cond);    \
      std::abort();                                                                \
    }                                                                              \
  } while (0)

bool same_extensions(const Header& a, const Header& b) {
  if (a.feature_names.size() != b.feature_names.size()) return false;
  for (size_t i = 0; i < a.feature_names.size(); ++i) {
    const auto& x = a.feature_names[i];
    const auto& y = b.feature_names[i];
    if (x.type != y.type || x.bit != y.bit || x.name != y.name) return false;
  }
  if (a.unknown_extensions.size() != b.unknown_extensions.size()) return false;
  for (size_t i = 0; i < a.unknown_extensions.size(); ++i) {
    if (a.unknown_extensions[i].type != b.unknown_extensions[i].type ||
        a.unknown_extensions[i].data != b.unknown_extensions[i].data) {
      return false;
    }
  }
  return a.bitmaps.has_value() == b.bitmaps.has_value() &&
         a.crypto_header.has_value() == b.crypto_header.has_value();
}

void check_round_trip(const Header& h) {
  auto bytes = uqcow::qcow2::serialize_header(h);
  if (!bytes.ok()) return;  // does not fit in the first cluster: refused, fine
  auto again = uqcow::qcow2::parse_header(*bytes);
  if (!again.ok()) {
    std::fprintf(stderr, "uqcow fuzz_header: serialised header does not parse: %s\n",
                 again.error().message().c_str());
    std::abort();
  }
  const Header& r = *again;
  FUZZ_EXPECT(r.version == h.version);
  FUZZ_EXPECT(r.cluster_bits == h.cluster_bits);
  FUZZ_EXPECT(r.size == h.size);
  FUZZ_EXPECT(r.crypt_method == h.crypt_method);
  FUZZ_EXPECT(r.l1_size == h.l1_size);
  FUZZ_EXPECT(r.l1_table_offset == h.l1_table_offset);
  FUZZ_EXPECT(r.refcount_table_offset == h.refcount_table_offset);
  FUZZ_EXPECT(r.refcount_table_clusters == h.refcount_table_clusters);
  FUZZ_EXPECT(r.nb_snapshots == h.nb_snapshots);
  FUZZ_EXPECT(r.snapshots_offset == h.snapshots_offset);
  FUZZ_EXPECT(r.incompatible_features == h.incompatible_features);
  FUZZ_EXPECT(r.compatible_features == h.compatible_features);
  FUZZ_EXPECT(r.autoclear_features == h.autoclear_features);
  FUZZ_EXPECT(r.refcount_order == h.refcount_order);
  FUZZ_EXPECT(r.compression_type == h.compression_type);
  FUZZ_EXPECT(r.extra_header_bytes == h.extra_header_bytes);
  FUZZ_EXPECT(r.backing_file == h.backing_file);
  FUZZ_EXPECT(r.backing_format == h.backing_format);
  FUZZ_EXPECT(r.data_file == h.data_file);
  FUZZ_EXPECT(same_extensions(r, h));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const uint8_t> input(data, size);
  auto header = uqcow::qcow2::parse_header(input);
  if (!header.ok()) return 0;
  check_round_trip(*header);
  // The snapshot table: whatever follows the first cluster, with the header's
  // count (bounded to 65536 by parse_header).
  if (size > header->cluster_size()) {
    auto table = input.subspan(header->cluster_size());
    auto snapshots = uqcow::qcow2::parse_snapshot_table(table, header->nb_snapshots, *header);
    if (snapshots.ok()) {
      auto bytes = uqcow::qcow2::serialize_snapshot_table(*snapshots);
      if (bytes.ok()) {
        auto again = uqcow::qcow2::parse_snapshot_table(*bytes, header->nb_snapshots, *header);
        FUZZ_EXPECT(again.ok() && again->size() == snapshots->size());
      }
    }
  }
  return 0;
}
