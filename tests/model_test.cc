// Randomised model-based test of the qcow2 write path: thousands of random
// reads, writes, write_zeroes, discards, compressed cluster writes and
// flushes, several in flight at once (when_all), against an in-memory model
// of the guest disk. Every read is checked against the model; at every
// close+reopen `qemu-img check` must find the image clean (exit 0) and the
// whole disk must read back as the model; at the end `qemu-img convert -O
// raw` (the independent oracle) must produce the model's bytes.
//
// The operations of one batch never overlap each other (in bytes), so the
// model stays exact; ops in one batch do share clusters and L2 slices, which
// is what exercises the engine's in-flight allocation and COW handling.
//
// Seeded: a failure prints the seed. Environment, for longer runs by hand:
//   UQCOW_MODEL_OPS   operations per configuration (default 1500)
//   UQCOW_MODEL_SEED  base seed (default 20261130)
//   UQCOW_MODEL_MAX_DEPTH  most ops in flight (default 16; 1 tells a
//                     concurrency bug from a sequential one)
//   UQCOW_MODEL_TRACE  file to write the ops to as qemu-io commands
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "block/open.h"
#include "engine/sync_wait.h"
#include "engine/when_all.h"
#include "qcow2/image.h"
#include "tests/testutil.h"
#include "uring/reactor.h"

namespace uqcow::testing {
namespace {

struct ModelConfig {
  const char* name;
  uint32_t cluster_size;
  bool extended_l2;
  uint32_t refcount_bits;
  bool backing;
  bool small_cache;  // the smallest L2 and refcount caches: constant eviction
  uint64_t size;
  bool v2 = false;  // compat=0.10: no zero flag (refcount_bits must be 16)
};

const ModelConfig kConfigs[] = {
    {"c512_rc16_smallcache", 512, false, 16, false, true, 4 << 20},
    {"c512_rc1_backing", 512, false, 1, true, false, 4 << 20},
    {"c512_rc64_backing_smallcache", 512, false, 64, true, true, 4 << 20},
    {"c4k_rc64", 4096, false, 64, false, false, 16 << 20},
    {"c4k_rc16_backing_smallcache", 4096, false, 16, true, true, 16 << 20},
    {"c4k_rc1_smallcache", 4096, false, 1, false, true, 16 << 20},
    {"c64k_rc16", 65536, false, 16, false, false, 64 << 20},
    {"c64k_rc1_backing_smallcache", 65536, false, 1, true, true, 64 << 20},
    {"c64k_extl2_rc16_smallcache", 65536, true, 16, false, true, 64 << 20},
    {"c64k_extl2_rc64_backing", 65536, true, 64, true, false, 64 << 20},
    {"c16k_extl2_rc1_backing_smallcache", 16384, true, 1, true, true, 32 << 20},
    // A v2 discard over a backing file does nothing (it could not read as
    // zeros), so v2 runs without one.
    {"c4k_v2_smallcache", 4096, false, 16, false, true, 16 << 20, true},
};

uint64_t env_or(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::strtoull(v, nullptr, 0) : fallback;
}

enum class Kind { kRead, kWrite, kWriteZeroes, kDiscard, kCompressed, kFlush };

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kRead: return "read";
    case Kind::kWrite: return "write";
    case Kind::kWriteZeroes: return "write_zeroes";
    case Kind::kDiscard: return "discard";
    case Kind::kCompressed: return "compressed write";
    case Kind::kFlush: return "flush";
  }
  return "?";
}

struct Op {
  Kind kind = Kind::kRead;
  uint64_t offset = 0;
  uint64_t length = 0;
  bool may_unmap = false;
  std::vector<uint8_t> data;  // what a write writes, or what a read got

  std::string describe() const {
    return std::string(kind_name(kind)) + " " + std::to_string(offset) + "+" + std::to_string(length) +
           (kind == Kind::kWriteZeroes && may_unmap ? " (may_unmap)" : "");
  }
  std::span<std::byte> bytes() { return std::as_writable_bytes(std::span(data)); }
  // The op as a qemu-io command (writes with a pattern instead of the data),
  // for replaying a failing sequence with qemu-io or `uqcow io`.
  std::string qemu_io_command() const {
    std::string range = std::to_string(offset) + " " + std::to_string(length);
    switch (kind) {
      case Kind::kRead: return "read " + range;
      case Kind::kWrite: return "write -P 0x5a " + range;
      case Kind::kWriteZeroes: return std::string("write -z ") + (may_unmap ? "-u " : "") + range;
      case Kind::kDiscard: return "discard " + range;
      case Kind::kCompressed: return "discard " + range + "\nwrite -c -P 0x5b " + range;
      case Kind::kFlush: return "flush";
    }
    return "";
  }
};

// One operation on the disk. A compressed write first discards its clusters:
// compression only fills unallocated clusters (EIO otherwise, as in QEMU),
// and a v3 discard leaves them reading as zeros with no host cluster.
Task<Status> run_op(qcow2::Qcow2Image& disk, Op& op) {
  switch (op.kind) {
    case Kind::kRead:
      co_return co_await disk.read(op.offset, op.bytes());
    case Kind::kWrite:
      co_return co_await disk.write(op.offset, op.bytes());
    case Kind::kWriteZeroes:
      co_return co_await disk.write_zeroes(op.offset, op.length, op.may_unmap);
    case Kind::kDiscard:
      co_return co_await disk.discard(op.offset, op.length);
    case Kind::kCompressed: {
      Status discarded = co_await disk.discard(op.offset, op.length);
      if (!discarded.ok()) co_return discarded;
      co_return co_await disk.write_compressed(op.offset, op.bytes());
    }
    case Kind::kFlush:
      co_return co_await disk.flush();
  }
  co_return Error(EINVAL, "unknown op");
}

class ModelTest : public ::testing::TestWithParam<ModelConfig> {
 protected:
  void SetUp() override {
    if (!require_tool("qemu-img") || !require_tool("qemu-io")) return;
    cfg_ = GetParam();
    seed_ = env_or("UQCOW_MODEL_SEED", 20261130) * 1000003 + std::hash<std::string>()(cfg_.name);
    ops_ = env_or("UQCOW_MODEL_OPS", 1500);
    if (const char* trace = std::getenv("UQCOW_MODEL_TRACE")) trace_ = std::fopen(trace, "w");
    max_depth_ = std::max<uint64_t>(env_or("UQCOW_MODEL_MAX_DEPTH", 16), 1);
    rng_.seed(seed_);
    model_.assign(cfg_.size, 0);
    auto reactor = uring::Reactor::create();
    ASSERT_TRUE(reactor.ok()) << reactor.error().message();
    reactor_ = std::move(reactor).value();
  }
  void TearDown() override {
    if (trace_ != nullptr) std::fclose(trace_);
    if (disk_) (void)sync_wait(*reactor_, disk_->close());
    disk_.reset();
  }

  void create_images();
  void open_image();
  void reopen_and_verify(const char* when);
  Op random_op(const std::vector<Op>& batch);
  void run_batch(std::vector<Op>& batch);
  void apply_to_model(const Op& op);
  void verify_whole_disk(const char* when);

  uint64_t below(uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(rng_); }
  std::string reproduce() const {
    return "seed " + std::to_string(seed_) + ", config " + cfg_.name + " (UQCOW_MODEL_SEED=" +
           std::to_string(env_or("UQCOW_MODEL_SEED", 20261130)) + " UQCOW_MODEL_OPS=" +
           std::to_string(ops_) + ")";
  }

  ModelConfig cfg_{};
  uint64_t seed_ = 0;
  uint64_t ops_ = 0;
  uint64_t max_depth_ = 16;
  FILE* trace_ = nullptr;
  std::mt19937_64 rng_;
  std::vector<uint8_t> model_;
  std::unique_ptr<TempDir> dir_ = std::make_unique<TempDir>("model");
  std::string image_;
  std::unique_ptr<uring::Reactor> reactor_;
  std::unique_ptr<Disk> disk_;
  qcow2::Qcow2Image* qcow2_ = nullptr;
};

void ModelTest::create_images() {
  ImageBuilder b(dir_->path());
  std::string options = "cluster_size=" + std::to_string(cfg_.cluster_size) +
                        ",refcount_bits=" + std::to_string(cfg_.refcount_bits) +
                        (cfg_.extended_l2 ? ",extended_l2=on" : "") + (cfg_.v2 ? ",compat=0.10" : "");
  if (cfg_.backing) {
    b.create("base.qcow2", "qcow2", "", cfg_.size);
    // A few patterned ranges in the base; the rest of it reads as zeros.
    std::vector<Write> writes;
    for (unsigned i = 0; i < 6; ++i) {
      uint64_t len = 1 + below(cfg_.size / 16);
      uint64_t off = below(cfg_.size - len);
      writes.push_back(P(off, len, 0x41 + i));
      std::fill_n(model_.begin() + off, len, static_cast<uint8_t>(0x41 + i));
    }
    b.write("base.qcow2", "qcow2", writes);
    b.create("disk.qcow2", "qcow2", options, 0, "base.qcow2", "qcow2");
  } else {
    b.create("disk.qcow2", "qcow2", options, cfg_.size);
  }
  ASSERT_TRUE(b.ok()) << b.error() << "\n" << b.script();
  image_ = dir_->file("disk.qcow2");
}

void ModelTest::open_image() {
  OpenOptions o;
  o.read_only = false;
  if (cfg_.small_cache) {
    o.l2_cache_size = 1;        // rounded up to the minimum number of slices
    o.refcount_cache_size = 1;  // likewise, in clusters
  }
  auto d = sync_wait(*reactor_, open_disk(image_, o));
  ASSERT_TRUE(d.ok()) << d.error().message();
  disk_ = std::move(d).value();
  qcow2_ = dynamic_cast<qcow2::Qcow2Image*>(disk_.get());
  ASSERT_NE(qcow2_, nullptr);
}

void ModelTest::verify_whole_disk(const char* when) {
  std::vector<uint8_t> buf(1 << 20);
  for (uint64_t pos = 0; pos < cfg_.size; pos += buf.size()) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), cfg_.size - pos));
    Status s = sync_wait(*reactor_, disk_->read(pos, std::as_writable_bytes(std::span(buf.data(), n))));
    ASSERT_TRUE(s.ok()) << when << ": read " << pos << ": " << s.message();
    ASSERT_TRUE(SameBytes(std::span(buf.data(), n), std::span(model_.data() + pos, n), pos)) << when;
  }
}

void ModelTest::reopen_and_verify(const char* when) {
  Status closed = sync_wait(*reactor_, disk_->close());
  ASSERT_TRUE(closed.ok()) << closed.message();
  disk_.reset();
  qcow2_ = nullptr;
  // Exit 0: no corruption and no leaks.
  CommandResult check = run_command({"qemu-img", "check", image_});
  ASSERT_TRUE(Succeeded(check)) << when;
  ASSERT_NO_FATAL_FAILURE(open_image());
  ASSERT_NO_FATAL_FAILURE(verify_whole_disk(when));
}

// A random op whose byte range overlaps no other op of `batch`. Offsets
// favour a hot window at the start of the disk so that ops keep meeting the
// same clusters and L2 slices.
Op ModelTest::random_op(const std::vector<Op>& batch) {
  const uint64_t cs = cfg_.cluster_size;
  const uint64_t hot = std::min<uint64_t>(cfg_.size, 64 * cs);
  for (int attempt = 0;; ++attempt) {
    Op op;
    uint64_t roll = below(100);
    op.kind = roll < 35 ? Kind::kRead
              : roll < 67 ? Kind::kWrite
              : roll < 79 ? Kind::kWriteZeroes
              : roll < 88 ? Kind::kDiscard
              : roll < 96 ? Kind::kCompressed
                          : Kind::kFlush;
    if (attempt > 20) op.kind = Kind::kFlush;  // crowded batch: stop looking
    if (op.kind == Kind::kFlush) return op;
    const uint64_t span_end = below(10) < 6 ? hot : cfg_.size;
    if (op.kind == Kind::kCompressed) {
      uint64_t clusters = 1 + below(4);
      op.offset = below(span_end / cs - clusters + 1) * cs;
      op.length = clusters * cs;
    } else {
      op.length = below(10) == 0 ? 1 + below(32 * cs) : 1 + below(3 * cs);
      op.length = std::min(op.length, cfg_.size);
      op.offset = below(span_end >= op.length ? span_end - op.length + 1 : cfg_.size - op.length + 1);
      if (below(3) == 0) op.offset &= ~(cs - 1);  // cluster aligned start
    }
    bool overlaps = false;
    for (const Op& other : batch) {
      if (other.kind != Kind::kFlush && op.offset < other.offset + other.length &&
          other.offset < op.offset + op.length) {
        overlaps = true;
      }
    }
    if (overlaps) continue;
    op.may_unmap = below(2) == 0;
    if (op.kind == Kind::kRead) op.data.assign(op.length, 0xee);
    if (op.kind == Kind::kWrite || op.kind == Kind::kCompressed) {
      op.data.resize(op.length);
      if (op.kind == Kind::kCompressed && below(5) != 0) {
        // Compressible: runs of a few byte values.
        for (uint64_t i = 0; i < op.length;) {
          uint64_t run = 1 + below(200);
          std::fill_n(op.data.begin() + i, std::min(run, op.length - i), static_cast<uint8_t>(below(4)));
          i += run;
        }
      } else {
        for (auto& byte : op.data) byte = static_cast<uint8_t>(rng_());
      }
    }
    return op;
  }
}

void ModelTest::apply_to_model(const Op& op) {
  const uint64_t cs = cfg_.cluster_size;
  switch (op.kind) {
    case Kind::kWrite:
    case Kind::kCompressed:
      std::copy(op.data.begin(), op.data.end(), model_.begin() + op.offset);
      break;
    case Kind::kWriteZeroes:
      std::fill_n(model_.begin() + op.offset, op.length, 0);
      break;
    case Kind::kDiscard: {
      // Whole clusters only (QEMU's rule); they then read as zeros (v3 also
      // over a backing file; v2 runs have none).
      uint64_t start = (op.offset + cs - 1) & ~(cs - 1);
      uint64_t end = (op.offset + op.length) & ~(cs - 1);
      if (start < end) std::fill(model_.begin() + start, model_.begin() + end, 0);
      break;
    }
    case Kind::kRead:
    case Kind::kFlush:
      break;
  }
}

void ModelTest::run_batch(std::vector<Op>& batch) {
  std::vector<Task<Status>> tasks;
  for (Op& op : batch) tasks.push_back(run_op(*qcow2_, op));
  std::vector<Status> results = sync_wait(*reactor_, when_all(std::move(tasks)));
  for (size_t i = 0; i < batch.size(); ++i) {
    ASSERT_TRUE(results[i].ok()) << batch[i].describe() << ": " << results[i].message();
  }
  // Reads see the model as it was before the batch; no write of the batch
  // overlaps them, so the order does not matter.
  for (const Op& op : batch) {
    if (op.kind != Kind::kRead) continue;
    ASSERT_TRUE(SameBytes(op.data, std::span(model_.data() + op.offset, op.length), op.offset))
        << op.describe();
  }
  for (const Op& op : batch) apply_to_model(op);
}

TEST_P(ModelTest, RandomOpsMatchTheModel) {
  if (IsSkipped()) return;
  SCOPED_TRACE(reproduce());
  ASSERT_NO_FATAL_FAILURE(create_images());
  ASSERT_NO_FATAL_FAILURE(open_image());
  const uint64_t reopen_every = std::max<uint64_t>(ops_ / 6, 50);
  uint64_t done = 0, next_reopen = reopen_every;
  while (done < ops_) {
    static constexpr size_t kDepths[] = {1, 1, 2, 3, 4, 6, 8, 16};
    size_t depth = std::min<size_t>(kDepths[below(std::size(kDepths))], max_depth_);
    std::vector<Op> batch;
    for (size_t i = 0; i < depth; ++i) batch.push_back(random_op(batch));
    std::string trace = "batch after " + std::to_string(done) + " ops:";
    for (const Op& op : batch) trace += "\n  " + op.describe();
    SCOPED_TRACE(trace);
    if (trace_ != nullptr) {
      for (const Op& op : batch) std::fprintf(trace_, "%s\n", op.qemu_io_command().c_str());
      std::fflush(trace_);
    }
    ASSERT_NO_FATAL_FAILURE(run_batch(batch));
    done += batch.size();
    if (done >= next_reopen) {
      next_reopen += reopen_every;
      ASSERT_NO_FATAL_FAILURE(reopen_and_verify("after reopen"));
    }
  }
  ASSERT_NO_FATAL_FAILURE(reopen_and_verify("at the end"));
  Status closed = sync_wait(*reactor_, disk_->close());
  ASSERT_TRUE(closed.ok()) << closed.message();
  disk_.reset();
  // The independent oracle: QEMU's view of the final image.
  std::string raw = dir_->file("final.raw");
  ASSERT_TRUE(Succeeded(run_command({"qemu-img", "convert", "-O", "raw", image_, raw})));
  auto bytes = read_file(raw);
  ASSERT_TRUE(bytes.has_value());
  EXPECT_TRUE(SameBytes(*bytes, model_));
}

// Found by the model test: zeroing a range that covers whole clusters and
// part of a compressed cluster (extended L2: zeros by subcluster, which a
// compressed cluster cannot do) returned after the compressed part, leaking
// the clusters already zeroed and leaving the rest of the range unzeroed.
TEST(ModelRegression, ZeroingPartOfACompressedClusterWithExtendedL2) {
  UQ_REQUIRE_TOOL("qemu-img");
  UQ_REQUIRE_TOOL("qemu-io");
  TempDir dir("model");
  struct Case {
    uint64_t offset, length;
  };
  // 64k clusters 0-2 compressed; zero [offset, offset + length).
  for (Case c : {Case{0, 96 << 10}, Case{32 << 10, 160 << 10}, Case{32 << 10, 64 << 10}}) {
    SCOPED_TRACE("write_zeroes " + std::to_string(c.offset) + "+" + std::to_string(c.length));
    ImageBuilder b(dir.path());
    b.run({"rm", "-f", "disk.qcow2"});
    b.create("disk.qcow2", "qcow2", "cluster_size=64k,extended_l2=on", 1 << 20);
    b.run({"qemu-io", "-f", "qcow2", "-c", "write -c -P 0x61 0 192k", "disk.qcow2"});
    ASSERT_TRUE(b.ok()) << b.error();
    auto disk = SyncDisk::open(dir.file("disk.qcow2"), {.read_only = false});
    ASSERT_TRUE(disk.ok()) << disk.error().message();
    auto reactor_done = [&](Task<Status> t) { return sync_wait(uring::Reactor::current(), std::move(t)); };
    for (bool may_unmap : {false, true}) {
      Status s = reactor_done((*disk)->disk().write_zeroes(c.offset, c.length, may_unmap));
      ASSERT_TRUE(s.ok()) << s.message();
    }
    ASSERT_TRUE((*disk)->close().ok());
    disk->reset();
    EXPECT_TRUE(Succeeded(run_command({"qemu-img", "check", dir.file("disk.qcow2")})));
    const uint64_t end = c.offset + c.length;
    std::vector<std::string> reads = {"qemu-io", "-r", "-f", "qcow2"};
    if (c.offset > 0) reads.insert(reads.end(), {"-c", "read -P 0x61 0 " + std::to_string(c.offset)});
    reads.insert(reads.end(), {"-c", "read -P 0 " + std::to_string(c.offset) + " " + std::to_string(c.length)});
    reads.insert(reads.end(), {"-c", "read -P 0x61 " + std::to_string(end) + " " + std::to_string((192 << 10) - end)});
    reads.push_back(dir.file("disk.qcow2"));
    CommandResult r = run_command(reads);
    EXPECT_TRUE(Succeeded(r));
    EXPECT_EQ(r.out.find("verification failed"), std::string::npos) << r.describe();
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, ModelTest, ::testing::ValuesIn(kConfigs),
                         [](const ::testing::TestParamInfo<ModelConfig>& info) {
                           return std::string(info.param.name);
                         });

}  // namespace
}  // namespace uqcow::testing
