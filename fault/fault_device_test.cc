// FaultInjectingDevice and RecordingDevice over a raw file: rule parsing,
// arming after K events, once versus always, immediately versus after a
// reactor turn, and the write log's contents and clock.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "block/debug_event.h"
#include "engine/sync_wait.h"
#include "engine/when_all.h"
#include "fault/fault_device.h"
#include "fault/recording_device.h"
#include "uring/raw_file.h"
#include "uring/reactor.h"

namespace uqcow {
namespace {

TEST(FaultRule, Parses) {
  auto r = parse_fault_rule("event=l2_update,errno=28,once=on,after=3,immediately=on");
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->event, BlkDebugEvent::kL2Update);
  EXPECT_EQ(r->error, ENOSPC);
  EXPECT_TRUE(r->once);
  EXPECT_EQ(r->after, 3u);
  EXPECT_TRUE(r->immediately);
  auto d = parse_fault_rule("event=flush_to_disk");
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->error, EIO);
  EXPECT_FALSE(d->once);
}

TEST(FaultRule, ErrorsNameTheBadKey) {
  struct Case {
    const char* text;
    const char* mentions;
  } cases[] = {
      {"event=l2_updat,errno=5", "event='l2_updat'"}, {"event=l2_update,errno=five", "errno='five'"},
      {"event=l2_update,errno=0", "errno=0"},         {"event=l2_update,once=maybe", "once='maybe'"},
      {"event=l2_update,after=-1", "after='-1'"},     {"event=l2_update,sector=5", "unknown key 'sector'"},
      {"errno=5", "no event"},                        {"event=l2_update,once", "'once' is not KEY=VALUE"},
  };
  for (const auto& c : cases) {
    auto r = parse_fault_rule(c.text);
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_EQ(r.error().code(), EINVAL);
    EXPECT_NE(r.error().message().find(c.mentions), std::string::npos) << r.error().message();
  }
}

TEST(BlkDebugEvent, NamesRoundTrip) {
  for (unsigned i = 0; i < kBlkDebugEventCount; ++i) {
    auto e = static_cast<BlkDebugEvent>(i);
    auto back = parse_blkdebug_event(blkdebug_event_name(e));
    ASSERT_TRUE(back.has_value()) << blkdebug_event_name(e);
    EXPECT_EQ(*back, e);
  }
  EXPECT_FALSE(parse_blkdebug_event("nope").has_value());
}

class DeviceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* base = std::getenv("TEST_TMPDIR");
    path_ = std::string(base && *base ? base : "/tmp") + "/fault_device_test." + std::to_string(getpid());
    auto reactor = uring::Reactor::create();
    ASSERT_TRUE(reactor.ok()) << reactor.error().message();
    reactor_ = std::move(reactor).value();
  }
  void TearDown() override { unlink(path_.c_str()); }

  std::unique_ptr<BlockDevice> raw() {
    auto f = RawFile::open(path_, {.create = true});
    EXPECT_TRUE(f.ok());
    return std::move(f).value();
  }
  template <class T>
  T run(Task<T> t) {
    return sync_wait(*reactor_, std::move(t));
  }
  Status write(BlockDevice& d, uint64_t off, size_t n, char c) {
    std::vector<std::byte> buf(n, std::byte(c));
    return run(d.co_write(off, buf));
  }

  std::string path_;
  std::unique_ptr<uring::Reactor> reactor_;
};

TEST_F(DeviceTest, ArmsAfterKEventsAndFailsTheNextRequest) {
  auto inj = std::make_shared<FaultInjector>();
  inj->add_rule(parse_fault_rule("event=l1_update,errno=28,once=on,after=2").value());
  FaultInjectingDevice dev(raw(), inj);
  dev.debug_event(BlkDebugEvent::kL2Update);  // another event: ignored
  dev.debug_event(BlkDebugEvent::kL1Update);
  dev.debug_event(BlkDebugEvent::kL1Update);
  EXPECT_TRUE(write(dev, 0, 512, 'a').ok()) << "armed too early";
  dev.debug_event(BlkDebugEvent::kL1Update);  // the third: arms
  Status s = write(dev, 0, 512, 'b');
  EXPECT_EQ(s.code(), ENOSPC);
  EXPECT_NE(s.message().find("l1_update"), std::string::npos) << s.message();
  EXPECT_TRUE(write(dev, 0, 512, 'c').ok()) << "once=on must disarm";
  dev.debug_event(BlkDebugEvent::kL1Update);
  EXPECT_TRUE(run(dev.co_flush()).ok()) << "a spent once rule stays spent";
  EXPECT_EQ(inj->state(0).injected, 1u);
  EXPECT_EQ(inj->state(0).events, 3u);
  // The failed write never reached the file.
  std::vector<std::byte> buf(512);
  ASSERT_TRUE(run(dev.co_read(0, buf)).ok());
  EXPECT_EQ(buf[0], std::byte('c'));
}

TEST_F(DeviceTest, AlwaysFailsEveryLaterRequest) {
  auto inj = std::make_shared<FaultInjector>();
  inj->add_rule(parse_fault_rule("event=flush_to_disk,errno=5").value());
  FaultInjectingDevice dev(raw(), inj);
  dev.debug_event(BlkDebugEvent::kFlushToDisk);
  std::vector<std::byte> buf(512);
  EXPECT_EQ(run(dev.co_flush()).code(), EIO);
  EXPECT_EQ(run(dev.co_read(0, buf)).code(), EIO);
  EXPECT_EQ(run(dev.co_discard(0, 512)).code(), EIO);
  EXPECT_EQ(run(dev.co_write_zeroes(0, 512, false)).code(), EIO);
  EXPECT_EQ(inj->state(0).injected, 4u);
}

// immediately=on fails without suspending; otherwise the caller is resumed
// by the reactor like a real completion.
TEST_F(DeviceTest, ImmediatelyDecidesWhetherTheFailureSuspends) {
  for (bool immediately : {true, false}) {
    auto inj = std::make_shared<FaultInjector>();
    inj->add_rule(parse_fault_rule(std::string("event=write_aio,errno=5,immediately=") + (immediately ? "on" : "off")).value());
    FaultInjectingDevice dev(raw(), inj);
    dev.debug_event(BlkDebugEvent::kWriteAio);
    std::vector<std::byte> buf(512);
    // Started together, in order: the failing write, then a task that never
    // suspends. If the failure suspends, the second task finishes first.
    std::vector<int> order;
    auto failing = [&]() -> Task<Status> {
      Status st = co_await dev.co_write(0, buf);
      order.push_back(1);
      co_return st;
    };
    auto other = [&]() -> Task<Status> {
      order.push_back(2);
      co_return Status();
    };
    std::vector<Task<Status>> tasks;
    tasks.push_back(failing());
    tasks.push_back(other());
    std::vector<Status> results = run(when_all(std::move(tasks)));
    EXPECT_EQ(results[0].code(), EIO);
    EXPECT_EQ(order, immediately ? std::vector<int>({1, 2}) : std::vector<int>({2, 1}));
  }
}

TEST_F(DeviceTest, RecordingKeepsDataAndOrder) {
  auto log = std::make_shared<WriteLog>();
  RecordingDevice dev(raw(), log);
  ASSERT_TRUE(write(dev, 1000, 10, 'x').ok());
  ASSERT_TRUE(run(dev.co_flush()).ok());
  std::vector<std::byte> a(3, std::byte('a')), b(2, std::byte('b'));
  iovec iov[2] = {{a.data(), a.size()}, {b.data(), b.size()}};
  ASSERT_TRUE(run(dev.co_writev(0, std::span<iovec>(iov, 2))).ok());
  ASSERT_TRUE(run(dev.co_write_zeroes(4096, 512, false)).ok());
  ASSERT_TRUE(run(dev.co_discard(8192, 512)).ok());
  ASSERT_TRUE(dev.truncate(100000).ok());
  std::vector<std::byte> buf(5);
  ASSERT_TRUE(run(dev.co_read(0, buf)).ok());  // reads are not logged

  const auto& ops = log->ops();
  ASSERT_EQ(ops.size(), 6u);
  EXPECT_EQ(ops[0].kind, RecordedOp::Kind::kWrite);
  EXPECT_EQ(ops[0].offset, 1000u);
  EXPECT_EQ(std::string(ops[0].data.begin(), ops[0].data.end()), std::string(10, 'x'));
  EXPECT_EQ(ops[1].kind, RecordedOp::Kind::kFlush);
  EXPECT_EQ(std::string(ops[2].data.begin(), ops[2].data.end()), "aaabb");
  EXPECT_EQ(ops[3].kind, RecordedOp::Kind::kWriteZeroes);
  EXPECT_EQ(ops[4].kind, RecordedOp::Kind::kDiscard);
  EXPECT_EQ(ops[5].kind, RecordedOp::Kind::kTruncate);
  EXPECT_EQ(ops[5].length, 100000u);
  for (size_t i = 0; i < ops.size(); ++i) {
    EXPECT_TRUE(ops[i].ok);
    EXPECT_LT(ops[i].issued, ops[i].completed);
    if (i > 0) {
      EXPECT_LT(ops[i - 1].completed, ops[i].issued) << "sequential requests do not overlap";
    }
  }
}

}  // namespace
}  // namespace uqcow
