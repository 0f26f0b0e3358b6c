// LayeredBlockDevice forwards every call to the device it wraps: a layer that
// overrides nothing is invisible, and one that overrides a call sees only
// that call. The wrapped device here is an in-memory one that records what
// reaches it.
#include "uring/layered_device.h"

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "engine/sync_wait.h"

namespace uqcow {
namespace {

class MemoryDevice final : public BlockDevice {
 public:
  MemoryDevice() { listens_to_debug_events_ = true; }

  Task<Status> co_read(uint64_t offset, std::span<std::byte> buf) override {
    calls.push_back("read");
    std::memcpy(buf.data(), data.data() + offset, buf.size());
    co_return Status();
  }
  Task<Status> co_write(uint64_t offset, std::span<const std::byte> buf) override {
    calls.push_back("write");
    if (offset + buf.size() > data.size()) data.resize(offset + buf.size());
    std::memcpy(data.data() + offset, buf.data(), buf.size());
    co_return Status();
  }
  Task<Status> co_readv(uint64_t, std::span<iovec>) override {
    calls.push_back("readv");
    co_return Status();
  }
  Task<Status> co_writev(uint64_t, std::span<iovec>) override {
    calls.push_back("writev");
    co_return Status();
  }
  Task<Status> co_flush() override {
    calls.push_back("flush");
    co_return Status();
  }
  Task<Status> co_discard(uint64_t, uint64_t) override {
    calls.push_back("discard");
    co_return Status();
  }
  Task<Status> co_write_zeroes(uint64_t, uint64_t, bool may_unmap) override {
    calls.push_back(may_unmap ? "write_zeroes unmap" : "write_zeroes");
    co_return Status();
  }
  Result<uint64_t> length() const override { return data.size(); }
  Result<uint64_t> allocated_bytes() const override { return uint64_t{4096}; }
  Status truncate(uint64_t length) override {
    data.resize(length);
    return Status();
  }
  uint32_t alignment() const override { return 512; }
  bool read_only() const override { return true; }
  const std::string& name() const override { return name_; }
  void release_locks() override { calls.push_back("release_locks"); }

  std::vector<std::byte> data;
  std::vector<std::string> calls;
  std::vector<DebugEventId> events;

 protected:
  void on_debug_event(DebugEventId event) override { events.push_back(event); }

 private:
  std::string name_ = "memory";
};

enum class TestEvent : uint8_t { kFirst, kSecond };

TEST(LayeredBlockDeviceTest, ForwardsEveryCall) {
  auto owned = std::make_unique<MemoryDevice>();
  MemoryDevice& inner = *owned;
  LayeredBlockDevice layer(std::move(owned));

  const std::vector<std::byte> written = {std::byte{1}, std::byte{2}, std::byte{3}};
  ASSERT_TRUE(sync_wait(layer.co_write(2, written)).ok());
  std::vector<std::byte> read(3);
  ASSERT_TRUE(sync_wait(layer.co_read(2, read)).ok());
  EXPECT_EQ(read, written);
  iovec iov{};
  ASSERT_TRUE(sync_wait(layer.co_readv(0, std::span(&iov, 1))).ok());
  ASSERT_TRUE(sync_wait(layer.co_writev(0, std::span(&iov, 1))).ok());
  ASSERT_TRUE(sync_wait(layer.co_flush()).ok());
  ASSERT_TRUE(sync_wait(layer.co_discard(0, 1)).ok());
  ASSERT_TRUE(sync_wait(layer.co_write_zeroes(0, 1, true)).ok());
  layer.release_locks();
  EXPECT_EQ(inner.calls, (std::vector<std::string>{"write", "read", "readv", "writev", "flush", "discard",
                                                   "write_zeroes unmap", "release_locks"}));

  auto length = layer.length();
  ASSERT_TRUE(length.ok());
  EXPECT_EQ(*length, 5u);
  ASSERT_TRUE(layer.truncate(8).ok());
  EXPECT_EQ(inner.data.size(), 8u);
  auto allocated = layer.allocated_bytes();
  ASSERT_TRUE(allocated.ok());
  EXPECT_EQ(*allocated, 4096u);
  EXPECT_EQ(layer.alignment(), 512u);
  EXPECT_TRUE(layer.read_only());
  EXPECT_EQ(layer.name(), "memory");

  // Events announced on the layer reach the device under it.
  layer.debug_event(TestEvent::kSecond);
  layer.debug_event(TestEvent::kFirst);
  EXPECT_EQ(inner.events, (std::vector<DebugEventId>{1, 0}));
}

// A layer that changes writes only: reads still reach the device untouched.
class InvertingLayer final : public LayeredBlockDevice {
 public:
  using LayeredBlockDevice::LayeredBlockDevice;
  Task<Status> co_write(uint64_t offset, std::span<const std::byte> buf) override {
    std::vector<std::byte> inverted(buf.begin(), buf.end());
    for (auto& b : inverted) b = ~b;
    co_return co_await inner().co_write(offset, inverted);
  }
};

TEST(LayeredBlockDeviceTest, ALayerChangesOnlyWhatItOverrides) {
  auto owned = std::make_unique<MemoryDevice>();
  MemoryDevice& inner = *owned;
  InvertingLayer layer(std::move(owned));
  const std::vector<std::byte> written = {std::byte{0x0f}, std::byte{0xf0}};
  ASSERT_TRUE(sync_wait(layer.co_write(0, written)).ok());
  EXPECT_EQ(inner.data, (std::vector<std::byte>{std::byte{0xf0}, std::byte{0x0f}}));
  std::vector<std::byte> read(2);
  ASSERT_TRUE(sync_wait(layer.co_read(0, read)).ok());
  EXPECT_EQ(read, inner.data);
  EXPECT_EQ(inner.calls, (std::vector<std::string>{"write", "read"}));
}

}  // namespace
}  // namespace uqcow
