// The snapshot table parser's contract with its reader: ENODATA means "give
// me more bytes", EINVAL means "this table is bad" (never guessed from the
// message text).
#include <gtest/gtest.h>

#include <vector>

#include "qcow2/snapshot.h"

namespace uqcow::qcow2 {
namespace {

std::vector<uint8_t> table_of(int n) {
  std::vector<Snapshot> snaps(n);
  for (int i = 0; i < n; ++i) {
    snaps[i].id = std::to_string(i + 1);
    snaps[i].name = "snapshot-" + std::to_string(i + 1);
    snaps[i].l1_table_offset = uint64_t(i + 4) << 16;
    snaps[i].disk_size = 1 << 30;
  }
  auto t = serialize_snapshot_table(snaps);
  EXPECT_TRUE(t.ok());
  return t.ok() ? *t : std::vector<uint8_t>{};
}

TEST(SnapshotTable, TruncatedTablesAskForMoreBytes) {
  Header h;
  h.size = 1 << 30;
  std::vector<uint8_t> t = table_of(3);
  auto whole = parse_snapshot_table(t, 3, h);
  ASSERT_TRUE(whole.ok()) << whole.error().message();
  ASSERT_EQ(whole->size(), 3u);
  EXPECT_EQ((*whole)[2].name, "snapshot-3");
  for (size_t cut : {size_t{0}, size_t{20}, t.size() / 2, t.size() - 8}) {  // (the last bytes are padding)
    std::vector<uint8_t> part(t.begin(), t.begin() + static_cast<long>(cut));
    auto p = parse_snapshot_table(part, 3, h);
    ASSERT_FALSE(p.ok()) << cut;
    EXPECT_EQ(p.error().code(), ENODATA) << cut << ": " << p.error().message();
  }
}

TEST(SnapshotTable, DamageIsEinvalWhateverTheLength) {
  Header h;
  h.size = 1 << 30;
  std::vector<uint8_t> t = table_of(2);
  t[36] = 0xff;  // extra_data_size of entry 0: far above 1024
  auto p = parse_snapshot_table(t, 2, h);
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.error().code(), EINVAL);
  EXPECT_NE(p.error().message().find("extra_data_size"), std::string::npos) << p.error().message();
}

}  // namespace
}  // namespace uqcow::qcow2
