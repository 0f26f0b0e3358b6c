// The README's embedding example, compiled and run so that it stays true: a
// storage daemon's request handlers on one reactor, issuing co_await reads
// and writes on an image opened through the library. qemu-io is the oracle
// for what the handlers wrote.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "block/open.h"
#include "engine/sync_wait.h"
#include "engine/task_group.h"
#include "tests/testutil.h"
#include "uring/reactor.h"

namespace uqcow {
namespace {

// --- the example, as the README shows it -----------------------------------
struct Request {
  bool is_write;
  uint64_t offset;
  std::vector<std::byte> data;  // the payload, or the buffer a read fills
  Status result;
};

// One handler per request; many run at once on the reactor's thread. A read
// whose L2 slice is cached takes no lock and allocates nothing.
Task<void> handle(Disk& disk, Request& req) {
  if (req.is_write) {
    req.result = co_await disk.write(req.offset, req.data);
  } else {
    req.result = co_await disk.read(req.offset, req.data);
  }
}

Task<Status> serve_batch(Disk& disk, std::vector<Request>& batch) {
  TaskGroup handlers;
  for (auto& req : batch) handlers.spawn(handle(disk, req));
  co_await handlers.join();
  co_return co_await disk.flush();
}

Status run_daemon(const std::string& path, std::vector<Request>& batch) {
  auto reactor = uring::Reactor::create();  // one ring per thread
  if (!reactor.ok()) return std::move(reactor).error();
  OpenOptions options;
  options.read_only = false;
  options.l2_cache_size = 4 << 20;  // QEMU's option names and meanings
  auto disk = sync_wait(**reactor, open_disk(path, options));
  if (!disk.ok()) return std::move(disk).error();
  Status served = sync_wait(**reactor, serve_batch(**disk, batch));
  Status closed = sync_wait(**reactor, (*disk)->close());  // flushes, clears the dirty bit
  return served.ok() ? closed : served;
}
// ----------------------------------------------------------------------------

TEST(EmbedExample, HandlersWriteAndReadConcurrently) {
  UQ_REQUIRE_TOOL("qemu-img");
  UQ_REQUIRE_TOOL("qemu-io");
  testing::TempDir dir("embed");
  const std::string img = dir.file("disk.qcow2");
  ASSERT_TRUE(testing::Succeeded(testing::run_command({"qemu-img", "create", "-q", "-f", "qcow2", img, "64M"})));

  constexpr int kWrites = 64;
  std::vector<Request> writes;
  for (int i = 0; i < kWrites; ++i) {
    // 4 KiB at 1 MiB + 128 KiB * i: each in its own cluster, all in flight at once.
    writes.push_back({true, (1u << 20) + uint64_t(i) * (128u << 10), std::vector<std::byte>(4096, std::byte(i + 1)), {}});
  }
  Status s = run_daemon(img, writes);
  ASSERT_TRUE(s.ok()) << s.error().message();
  for (const auto& w : writes) EXPECT_TRUE(w.result.ok()) << w.result.error().message();

  EXPECT_TRUE(testing::Succeeded(testing::run_command({"qemu-img", "check", img})));
  for (int i = 0; i < kWrites; i += 9) {
    const std::string cmd = "read -P " + std::to_string(i + 1) + " " + std::to_string(writes[i].offset) + " 4096";
    EXPECT_TRUE(testing::Succeeded(testing::run_command({"qemu-io", "-r", "-c", cmd, img})));
  }

  std::vector<Request> reads;
  for (int i = 0; i < kWrites; ++i) reads.push_back({false, writes[i].offset, std::vector<std::byte>(4096), {}});
  s = run_daemon(img, reads);
  ASSERT_TRUE(s.ok()) << s.error().message();
  for (int i = 0; i < kWrites; ++i) {
    ASSERT_TRUE(reads[i].result.ok()) << reads[i].result.error().message();
    EXPECT_EQ(reads[i].data, writes[i].data) << "request " << i;
  }
}

}  // namespace
}  // namespace uqcow
