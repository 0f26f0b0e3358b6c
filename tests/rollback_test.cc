// Rollbacks of in-memory metadata when a disk write fails (issue 13): a
// fault is injected on one metadata write (fault/fault_rule.h, blkdebug
// style, keyed on the debug event just before it). The operation must fail,
// the same open image must keep reading what it read before (its in-memory
// tables still match the disk), it must keep working once the fault is gone,
// and after close `qemu-img check` must find no corruption (leaks allowed,
// as QEMU allows them) and qemu-img must read the expected content.
#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "block/options.h"
#include "fault/fault_device.h"
#include "qcow2/image.h"
#include "tests/testutil.h"

namespace uqcow::testing {
namespace {

class RollbackTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!require_tool("qemu-img") || !require_tool("qemu-io")) return;
  }

  void sh(const std::vector<std::string>& argv) { ASSERT_TRUE(Succeeded(run_command(argv, dir_.path()))); }

  // Opens `img` read-write with the fault `rule`, runs `op` (which must fail
  // with the injected error), and checks the image as the header says.
  // `retry` runs once the fault is spent and updates `want`, the guest
  // content qemu-img must read at the end.
  void fail_once(const std::string& img, const std::string& rule,
                 const std::function<Status(SyncDisk&, qcow2::Qcow2Image&)>& op,
                 const std::function<void(SyncDisk&, qcow2::Qcow2Image&, std::vector<uint8_t>&)>& retry = {},
                 bool op_writes_guest_data = false) {
    OpenOptions options;
    options.read_only = false;
    auto injector = std::make_shared<FaultInjector>();
    ASSERT_TRUE(injector->add_rule(rule).ok());
    options.wrap_file = fault_injection(injector);
    auto disk = SyncDisk::open(dir_.file(img), options);
    ASSERT_TRUE(disk.ok()) << disk.error().message();
    auto* image = dynamic_cast<qcow2::Qcow2Image*>(&(*disk)->disk());
    ASSERT_NE(image, nullptr);
    auto before = (*disk)->read_all();
    ASSERT_TRUE(before.ok()) << before.error().message();
    const uint64_t size_before = (*disk)->size();

    Status s = op(**disk, *image);
    EXPECT_FALSE(s.ok()) << rule << ": the operation succeeded";
    EXPECT_EQ(injector->state(0).injected, 1u) << rule << ": the fault was not injected";
    EXPECT_EQ((*disk)->size(), size_before);
    auto after = (*disk)->read_all();
    ASSERT_TRUE(after.ok()) << after.error().message();
    // A failed guest write leaves its own range undefined (as on any disk);
    // a failed metadata operation leaves every byte as it was.
    if (!op_writes_guest_data) {
      EXPECT_TRUE(SameBytes(*after, *before)) << rule << ": the open image reads other data after the failure";
    }

    std::vector<uint8_t> want = *before;
    if (retry) retry(**disk, *image, want);
    auto reread = (*disk)->read_all();
    ASSERT_TRUE(reread.ok());
    EXPECT_TRUE(SameBytes(*reread, want));
    ASSERT_TRUE((*disk)->close().ok());

    // Leaks (exit 3) are allowed, corruption (exit 2) is not.
    auto check = run_command({"qemu-img", "check", dir_.file(img)});
    EXPECT_TRUE(check.exit_code == 0 || check.exit_code == 3) << check.describe();
    const std::string raw = dir_.file("want.raw");
    ASSERT_TRUE(write_file(raw, want));
    EXPECT_TRUE(Succeeded(run_command({"qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, dir_.file(img)})));
  }

  // An image with one snapshot: 0x11 in the first MiB at the snapshot, then
  // 0x22 over it and 0x33 further on in the active state.
  void snapshot_image(const std::string& img) {
    sh({"qemu-img", "create", "-q", "-f", "qcow2", img, "4M"});
    sh({"qemu-io", "-c", "write -P 0x11 0 1M", img});
    sh({"qemu-img", "snapshot", "-c", "s1", img});
    sh({"qemu-io", "-c", "write -P 0x22 0 1M", "-c", "write -P 0x33 2M 64k", img});
  }

  TempDir dir_{"rollback"};
};

Status write_pattern(SyncDisk& d, uint64_t offset, uint64_t length, uint8_t pattern) {
  std::vector<std::byte> buf(length, std::byte{pattern});
  return d.run(d.disk().write(offset, buf));
}

// The known bug: the in-memory L1 was switched to the snapshot's before the
// active L1 reached the disk, so the open image read the snapshot's data
// while the disk still held the active state.
TEST_F(RollbackTest, SnapshotApplyKeepsTheActiveL1WhenItsWriteFails) {
  snapshot_image("a.qcow2");
  fail_once("a.qcow2", "event=l1_update,errno=5,once=on",
            [](SyncDisk& d, qcow2::Qcow2Image& q) { return d.run(q.snapshot_apply("s1")); },
            [](SyncDisk& d, qcow2::Qcow2Image& q, std::vector<uint8_t>& want) {
              // The fault is spent: the apply now goes through.
              ASSERT_TRUE(d.run(q.snapshot_apply("s1")).ok());
              std::fill(want.begin(), want.end(), 0);
              std::fill(want.begin(), want.begin() + (1 << 20), 0x11);
            });
}

TEST_F(RollbackTest, SnapshotCreateKeepsTheActiveL1WhenItsWriteFails) {
  snapshot_image("c.qcow2");
  fail_once("c.qcow2", "event=l1_update,errno=5,once=on",
            [](SyncDisk& d, qcow2::Qcow2Image& q) { return d.run(q.snapshot_create("s2")); },
            [](SyncDisk& d, qcow2::Qcow2Image& q, std::vector<uint8_t>& want) {
              // Writes still go where the disk's tables say.
              ASSERT_TRUE(write_pattern(d, 0, 64 << 10, 0x44).ok());
              std::fill(want.begin(), want.begin() + (64 << 10), 0x44);
              ASSERT_TRUE(d.run(q.snapshot_create("s2")).ok());
            });
}

TEST_F(RollbackTest, SnapshotDeleteKeepsTheActiveL1WhenItsWriteFails) {
  // The active L2 table is still shared with the snapshot: deleting it sets
  // COPIED in the active L1 again, the write that fails here.
  sh({"qemu-img", "create", "-q", "-f", "qcow2", "d.qcow2", "4M"});
  sh({"qemu-io", "-c", "write -P 0x11 0 1M", "d.qcow2"});
  sh({"qemu-img", "snapshot", "-c", "s1", "d.qcow2"});
  fail_once("d.qcow2", "event=l1_update,errno=5,once=on",
            [](SyncDisk& d, qcow2::Qcow2Image& q) { return d.run(q.snapshot_delete("s1")); },
            [](SyncDisk& d, qcow2::Qcow2Image& q, std::vector<uint8_t>& want) {
              ASSERT_TRUE(write_pattern(d, 0, 64 << 10, 0x55).ok());
              std::fill(want.begin(), want.begin() + (64 << 10), 0x55);
              // The snapshot is gone (the header switched before the fault);
              // COPIED, which the failed write was to set, stays clear on
              // disk until the next snapshot operation recomputes it, as in
              // QEMU (whose check reports it until then).
              ASSERT_TRUE(d.run(q.snapshot_create("tmp")).ok());
              ASSERT_TRUE(d.run(q.snapshot_delete("tmp")).ok());
              EXPECT_TRUE(q.snapshots().empty());
            });
}

// Growing past what the L1 table covers: the header switch to the new table
// fails, and the image keeps its size and its table.
TEST_F(RollbackTest, ResizeKeepsSizeAndL1WhenTheHeaderWriteFails) {
  sh({"qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "g.qcow2", "1M"});
  sh({"qemu-io", "-c", "write -P 0x66 0 1M", "g.qcow2"});
  for (const char* rule : {"event=l1_grow_activate_table,errno=5,once=on", "event=l1_grow_write_table,errno=5,once=on"}) {
    SCOPED_TRACE(rule);
    fail_once("g.qcow2", rule, [](SyncDisk& d, qcow2::Qcow2Image& q) { return d.run(q.resize(64 << 20)); },
              [](SyncDisk& d, qcow2::Qcow2Image&, std::vector<uint8_t>& want) {
                ASSERT_TRUE(write_pattern(d, 4096, 4096, 0x67).ok());
                std::fill(want.begin() + 4096, want.begin() + 8192, 0x67);
              });
  }
}

// Writes that need new refcount blocks and a larger refcount table (512-byte
// clusters: a block counts 128 KiB, a one-cluster table 8 MiB). A fault at
// each step of hooking them up fails the write; the same write then goes
// through and every count stays right.
TEST_F(RollbackTest, RefcountStructureGrowthRollsBackOnEachFailedStep) {
  for (const char* event : {"refblock_alloc_write", "refblock_alloc_hookup", "refblock_alloc_write_blocks",
                            "refblock_alloc_write_table", "refblock_alloc_switch_table"}) {
    SCOPED_TRACE(event);
    sh({"qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "r.qcow2", "16M"});
    constexpr uint64_t kLen = 10 << 20;
    fail_once("r.qcow2", std::string("event=") + event + ",errno=5,once=on",
              [](SyncDisk& d, qcow2::Qcow2Image&) { return write_pattern(d, 0, kLen, 0x77); },
              [](SyncDisk& d, qcow2::Qcow2Image&, std::vector<uint8_t>& want) {
                ASSERT_TRUE(write_pattern(d, 0, kLen, 0x77).ok());
                std::fill(want.begin(), want.begin() + kLen, 0x77);
              },
              /*op_writes_guest_data=*/true);
  }
}

}  // namespace
}  // namespace uqcow::testing
