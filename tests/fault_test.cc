// The fault matrix: for every debug event x {EIO, ENOSPC} x {always, once,
// once and stop right after}, a write workload runs on an image whose file
// fails I/O after that event (blkdebug-style rules, fault/fault_rule.h). The workload copies tables
// shared with a snapshot (COW), allocates across many L2 tables with tiny
// caches, grows the refcount table and the L1 table, writes compressed
// data, zeroes, discards and creates/deletes snapshots.
//
// For each case: the failing request returns the rule's errno (or the
// fault hit only an advisory discard); after a once rule the later requests
// succeed; the image is closed without a crash. Then qemu-img check reports
// no corruption (exit 0 or 3), `uqcow check` gives the same verdict, and
// `uqcow check -r all` leaves it clean for qemu-img. Every byte acknowledged
// (and, if the image could not be closed cleanly, flushed) before the
// failure reads back intact through qemu-img convert.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "block/debug_event.h"
#include "fault/fault_device.h"
#include "qcow2/image.h"
#include "tests/testutil.h"

namespace uqcow::testing {
namespace {

constexpr uint64_t kSize = 16ull << 20;
constexpr uint64_t kGrownSize = 24ull << 20;
// 512-byte clusters and 64-bit refcounts: an L2 table maps 32 KiB and a
// refcount block counts 32 KiB, so the refcount table (one cluster) fills
// at 2 MiB of file and must grow.
constexpr const char* kCreateOptions = "cluster_size=512,refcount_bits=64";

// What the guest may expect of each byte.
struct Model {
  std::vector<uint8_t> data = std::vector<uint8_t>(kGrownSize, 0);
  std::vector<uint8_t> known = std::vector<uint8_t>(kGrownSize, 1);        // last write acknowledged
  std::vector<uint8_t> since_flush = std::vector<uint8_t>(kGrownSize, 0);  // touched after the last good flush

  void apply(uint64_t off, uint64_t len, bool ok, uint8_t fill) {
    if (off >= kGrownSize) return;
    len = std::min(len, kGrownSize - off);
    std::memset(&data[off], fill, len);
    std::memset(&known[off], ok, len);
    std::memset(&since_flush[off], 1, len);
  }
  void flushed() { std::memset(since_flush.data(), 0, since_flush.size()); }
  // Whether byte i must read back as data[i].
  bool checkable(uint64_t i, bool closed_ok) const { return known[i] && (closed_ok || !since_flush[i]); }
};

struct OpResult {
  std::string name;
  Status status;
};

// Runs the workload on an open image, recording every request's outcome.
class Workload {
 public:
  // With `stop_after_fault`, the first failed request is followed only by
  // a write into the same L2 table (allocating a cluster) and a flush, so
  // that later requests cannot mask state the failure left behind (e.g. an
  // in-memory table entry that never reached the disk).
  Workload(SyncDisk& disk, Model& model, bool stop_after_fault = false)
      : disk_(disk), model_(model), stop_after_fault_(stop_after_fault) {
    image_ = dynamic_cast<qcow2::Qcow2Image*>(&disk.disk());
  }

  void run() {
    write(1000, 100, 0x01);  // over a cluster shared with the snapshot: COW
    write(100 * 1024 + 7, 3000, 0x02);
    read(256 * 1024, 8 * 1024);  // compressed clusters
    read(0, 64 * 1024);
    for (uint64_t i = 0; i < 40; ++i) write((1 << 20) + i * 40 * 1024, 8 * 1024, static_cast<uint8_t>(0x10 + i));
    flush();
    for (uint64_t i = 0; i < 10; ++i) write((4ull << 20) + i * 256 * 1024, 256 * 1024, static_cast<uint8_t>(0x60 + i));
    write_compressed(12ull << 20, 4096, 0x7c);
    zero(1 << 20, 80 * 1024, true);
    discard((1 << 20) + 200 * 1024, 100 * 1024);
    // Freed clusters are reused once their unlink is on disk (the flush):
    // the write then allocates a freed cluster inside the file.
    flush();
    write((9ull << 20) + 7, 100, 0x72);
    resize(kGrownSize);
    write(20ull << 20, 64 * 1024, 0x70);
    snapshot_create("s2");
    write(0, 4096, 0x71);
    snapshot_delete("snap");
    read(1 << 20, 512 * 1024);
    flush();
    // Shrinking drops the data, the L2 tables and the refcount blocks past
    // the new end.
    if (s2_created_) snapshot_delete("s2");
    resize(kSize);
    // Past the new end: gone (zeros if it ever grows again); after a failed
    // shrink, maybe discarded, maybe not.
    const bool shrunk = !results_.empty() && results_.back().name == "resize" && results_.back().status.ok();
    model_.apply(kSize, kGrownSize - kSize, shrunk, 0);
    read(kSize - 64 * 1024, 64 * 1024);
    flush();
  }

  const std::vector<OpResult>& results() const { return results_; }

 private:
  void record(std::string name, Status s) {
    const bool failed = !s.ok();
    results_.push_back({std::move(name), std::move(s)});
    if (failed && stop_after_fault_ && !stopped_) {
      stopped_ = true;
      const uint64_t l2_coverage = 32 * 1024;  // 64 entries of 512-byte clusters
      write_now(last_offset_ / l2_coverage * l2_coverage + l2_coverage / 2 + 512, 512, 0x5a);
      flush_now();
    }
  }

  void write(uint64_t off, uint64_t len, uint8_t pattern) {
    if (!stopped_) write_now(off, len, pattern);
  }
  void write_now(uint64_t off, uint64_t len, uint8_t pattern) {
    last_offset_ = off;
    std::vector<std::byte> buf(len, std::byte{pattern});
    Status s = disk_.run(disk_.disk().write(off, buf));
    model_.apply(off, len, s.ok(), pattern);
    record("write " + std::to_string(off) + "+" + std::to_string(len), s);
  }
  void write_compressed(uint64_t off, uint64_t len, uint8_t pattern) {
    if (stopped_) return;
    last_offset_ = off;
    std::vector<std::byte> buf(len, std::byte{pattern});
    Status s = disk_.run(image_->write_compressed(off, buf));
    model_.apply(off, len, s.ok(), pattern);
    record("write -c " + std::to_string(off), s);
  }
  void zero(uint64_t off, uint64_t len, bool unmap) {
    if (stopped_) return;
    last_offset_ = off;
    Status s = disk_.run(disk_.disk().write_zeroes(off, len, unmap));
    model_.apply(off, len, s.ok(), 0);
    record("write -z " + std::to_string(off), s);
  }
  void discard(uint64_t off, uint64_t len) {  // cluster aligned: reads back as zeros
    if (stopped_) return;
    last_offset_ = off;
    Status s = disk_.run(disk_.disk().discard(off, len));
    model_.apply(off, len, s.ok(), 0);
    record("discard " + std::to_string(off), s);
  }
  void read(uint64_t off, uint64_t len) {
    if (stopped_) return;
    last_offset_ = off;
    std::vector<uint8_t> buf(len);
    Status s = disk_.read(off, buf);
    if (s.ok()) {
      for (uint64_t i = 0; i < len; ++i) {
        if (model_.checkable(off + i, true) && buf[i] != model_.data[off + i]) {
          s = Error(EILSEQ, "read back " + std::to_string(buf[i]) + " at " + std::to_string(off + i) +
                                ", expected " + std::to_string(model_.data[off + i]));
          break;
        }
      }
    }
    record("read " + std::to_string(off), s);
  }
  void flush() {
    if (!stopped_) flush_now();
  }
  void flush_now() {
    Status s = disk_.run(disk_.disk().flush());
    if (s.ok()) model_.flushed();
    record("flush", s);
  }
  void resize(uint64_t size) {
    if (!stopped_) record("resize", disk_.run(image_->resize(size)));
  }
  void snapshot_create(const std::string& name) {
    if (stopped_) return;
    Status s = disk_.run(image_->snapshot_create(name));
    if (name == "s2") s2_created_ = s.ok();
    record("snapshot -c " + name, std::move(s));
  }
  void snapshot_delete(const std::string& name) {
    if (!stopped_) record("snapshot -d " + name, disk_.run(image_->snapshot_delete(name)));
  }

  SyncDisk& disk_;
  Model& model_;
  qcow2::Qcow2Image* image_ = nullptr;
  std::vector<OpResult> results_;
  bool stop_after_fault_ = false;
  bool stopped_ = false;
  bool s2_created_ = false;
  uint64_t last_offset_ = 0;
};

OpenOptions small_caches() {
  OpenOptions o;
  o.read_only = false;
  o.l2_cache_size = 2048;        // four 512-byte L2 tables
  o.refcount_cache_size = 2048;  // four refcount blocks
  o.cache_clean_interval = 0;
  return o;
}

// The image every case starts from: data, compressed clusters, a snapshot.
// How a rule fires: every request after the event fails; only the next one
// does and the whole workload goes on; or only the next one does and the
// workload stops right after (see Workload).
enum Mode { kAlways, kOnce, kOnceThenStop };
const char* const kModeNames[] = {"always", "once", "once_stop"};

class FaultMatrix : public ::testing::TestWithParam<std::tuple<int, int, int>> {
 public:
  static void SetUpTestSuite() {
    if (!find_tool("qemu-img") || !find_tool("qemu-io")) return;
    dir_ = new TempDir("fault");
    ImageBuilder b(dir_->path());
    b.create("template.qcow2", "qcow2", kCreateOptions, kSize);
    b.run({"qemu-io", "-c", "write -P 0xa1 0 256k", "-c", "write -c -P 0xa2 256k 8k", "template.qcow2"});
    b.run({"qemu-img", "snapshot", "-c", "snap", "template.qcow2"});
    ASSERT_TRUE(b.ok()) << b.error();
    template_ = new std::vector<uint8_t>(*read_file(dir_->file("template.qcow2")));
  }
  static void TearDownTestSuite() {
    if (cases_ > 0) std::printf("fault matrix summary (this shard): %d cases, %d fired, %d reported an error, "
                "%d absorbed, %d never reached their event\n",
                cases_, fired_, reported_, absorbed_, unreached_);
    delete template_;
    template_ = nullptr;
    delete dir_;
    dir_ = nullptr;
  }

 protected:
  static Model initial_model() {
    Model m;
    std::fill_n(m.data.begin(), 256 * 1024, 0xa1);
    std::fill_n(m.data.begin() + 256 * 1024, 8 * 1024, 0xa2);
    return m;
  }

  static TempDir* dir_;
  static std::vector<uint8_t>* template_;
  static int cases_, fired_, reported_, absorbed_, unreached_;
};

TempDir* FaultMatrix::dir_ = nullptr;
std::vector<uint8_t>* FaultMatrix::template_ = nullptr;
int FaultMatrix::cases_ = 0, FaultMatrix::fired_ = 0, FaultMatrix::reported_ = 0, FaultMatrix::absorbed_ = 0,
    FaultMatrix::unreached_ = 0;

// Asserts the image is consistent, repairable, and holds the model's data.
void verify_image(const std::string& img, const Model& model, bool closed_ok, const std::string& what) {
  auto qcheck = run_command({"qemu-img", "check", img});
  EXPECT_TRUE(qcheck.exit_code == 0 || qcheck.exit_code == 3) << what << "\n" << qcheck.describe();
  auto ucheck = run_uqcow({"check", img});
  EXPECT_EQ(ucheck.exit_code, qcheck.exit_code) << what << "\n" << ucheck.describe() << "\n" << qcheck.describe();
  EXPECT_TRUE(Succeeded(run_uqcow({"check", "-q", "-r", "all", img}))) << what;
  auto after = run_command({"qemu-img", "check", img});
  EXPECT_EQ(after.exit_code, 0) << what << ": not clean after uqcow check -r all\n" << after.describe();

  const std::string raw = img + ".raw";
  ASSERT_TRUE(Succeeded(run_command({"qemu-img", "convert", "-O", "raw", img, raw}))) << what;
  auto guest = read_file(raw);
  ASSERT_TRUE(guest.has_value());
  const uint64_t end = std::min<uint64_t>(guest->size(), kGrownSize);
  constexpr uint64_t kChunk = 4096;
  for (uint64_t at = 0; at < end; at += kChunk) {
    const uint64_t n = std::min(kChunk, end - at);
    // Fast path (the test is built unoptimised): a chunk that is all
    // checkable compares with one memcmp.
    const bool all = !std::memchr(&model.known[at], 0, n) && (closed_ok || !std::memchr(&model.since_flush[at], 1, n));
    if (all && std::memcmp(&(*guest)[at], &model.data[at], n) == 0) continue;
    for (uint64_t i = at; i < at + n; ++i) {
      if (model.checkable(i, closed_ok) && (*guest)[i] != model.data[i]) {
        ADD_FAILURE() << what << ": guest byte " << i << " is " << int((*guest)[i]) << ", acknowledged "
                      << int(model.data[i]);
        return;
      }
    }
  }
  std::remove(raw.c_str());
}

TEST_P(FaultMatrix, WorkloadSurvivesFault) {
  UQ_REQUIRE_TOOL("qemu-img");
  UQ_REQUIRE_TOOL("qemu-io");
  ASSERT_NE(template_, nullptr);
  const auto [event_index, err, mode] = GetParam();
  const bool once = mode != kAlways;
  const auto event = static_cast<BlkDebugEvent>(event_index);
  const std::string rule_text = "event=" + std::string(blkdebug_event_name(event)) + ",errno=" +
                                std::to_string(err) + (once ? ",once=on" : "");
  const std::string img = dir_->file(std::string(blkdebug_event_name(event)) + "-" + std::to_string(err) + "-" +
                                     kModeNames[mode] + ".qcow2");
  ASSERT_TRUE(write_file(img, *template_));

  OpenOptions options = small_caches();
  auto injector = std::make_shared<FaultInjector>();
  ASSERT_TRUE(injector->add_rule(rule_text).ok());
  options.wrap_file = fault_injection(injector);
  Model model = initial_model();
  std::vector<OpResult> results;
  Status close_status;
  bool opened = false;
  const auto t0 = std::chrono::steady_clock::now();
  {
    auto disk = SyncDisk::open(img, options);
    if (disk.ok()) {
      opened = true;
      Workload w(**disk, model, mode == kOnceThenStop);
      w.run();
      results = w.results();
      close_status = (*disk)->close();
    } else {
      results.push_back({"open", disk.error()});
    }
  }  // the image object is gone here
  results.push_back({"close", close_status});

  const auto& state = injector->state(0);
  ++cases_;
  const std::string what = "rule " + rule_text + " (" + kModeNames[mode] + ")";
  size_t first_failure = results.size();
  for (size_t i = 0; i < results.size(); ++i) {
    if (!results[i].status.ok()) {
      first_failure = i;
      break;
    }
  }
  bool resize_failed = false;
  for (const auto& r : results) {
    if (r.name == "resize" && !r.status.ok()) resize_failed = true;
    // No request fails for another reason than the injected error (or, once
    // the resize failed, for lying beyond the end of the disk).
    if (r.status.ok() || (resize_failed && r.status.code() == EINVAL)) continue;
    EXPECT_EQ(r.status.code(), err) << what << ": " << r.name << ": " << r.status.message();
  }
  if (state.injected == 0) {
    ++unreached_;
    EXPECT_EQ(first_failure, results.size()) << what << ": a request failed without an injected fault: "
                                             << results[first_failure].status.message();
  } else {
    ++fired_;
    if (first_failure == results.size()) {
      // Only an advisory request (a discard of freed clusters) saw the fault.
      ++absorbed_;
    } else {
      ++reported_;
    }
    if (once) {
      for (size_t i = first_failure + 1; i < results.size(); ++i) {
        if (resize_failed && results[i].status.code() == EINVAL) continue;  // beyond the old end
        EXPECT_TRUE(results[i].status.ok()) << what << ": after the one fault (" << results[first_failure].name
                                            << "), " << results[i].name
                                            << " failed: " << results[i].status.message();
      }
    }
  }
  const auto t1 = std::chrono::steady_clock::now();
  std::printf("%-40s %-8s events=%-4llu injected=%-4llu first failure: %s\n", rule_text.c_str(),
              opened ? "opened" : "no-open", static_cast<unsigned long long>(state.events),
              static_cast<unsigned long long>(state.injected),
              first_failure < results.size() ? results[first_failure].name.c_str() : "none");
  verify_image(img, model, close_status.ok() && opened, what);
  std::remove(img.c_str());
  const auto t2 = std::chrono::steady_clock::now();
  using ms = std::chrono::milliseconds;
  std::printf("  workload %lld ms, checks %lld ms\n", static_cast<long long>(std::chrono::duration_cast<ms>(t1 - t0).count()),
              static_cast<long long>(std::chrono::duration_cast<ms>(t2 - t1).count()));
}

std::string case_name(const ::testing::TestParamInfo<FaultMatrix::ParamType>& info) {
  const auto [event_index, err, mode] = info.param;
  return std::string(blkdebug_event_name(static_cast<BlkDebugEvent>(event_index))) + "_" +
         (err == EIO ? "EIO" : "ENOSPC") + "_" + kModeNames[mode];
}

INSTANTIATE_TEST_SUITE_P(AllEvents, FaultMatrix,
                         ::testing::Combine(::testing::Range(0, static_cast<int>(kBlkDebugEventCount)),
                                            ::testing::Values(EIO, ENOSPC),
                                            ::testing::Values(kAlways, kOnce, kOnceThenStop)),
                         case_name);

// Without faults the workload succeeds, and it reaches the events that the
// matrix means to test (a rule that never arms counts them).
TEST_F(FaultMatrix, WorkloadReachesTheEvents) {
  UQ_REQUIRE_TOOL("qemu-img");
  UQ_REQUIRE_TOOL("qemu-io");
  ASSERT_NE(template_, nullptr);
  const std::string img = dir_->file("baseline.qcow2");
  ASSERT_TRUE(write_file(img, *template_));
  OpenOptions options = small_caches();
  auto injector = std::make_shared<FaultInjector>();
  for (unsigned e = 0; e < kBlkDebugEventCount; ++e) {
    ASSERT_TRUE(injector
                    ->add_rule("event=" + std::string(blkdebug_event_name(static_cast<BlkDebugEvent>(e))) +
                               ",errno=5,after=1000000000")
                    .ok());
  }
  options.wrap_file = fault_injection(injector);
  Model model = initial_model();
  {
    auto disk = SyncDisk::open(img, options);
    ASSERT_TRUE(disk.ok()) << disk.error().message();
    Workload w(**disk, model);
    w.run();
    for (const auto& r : w.results()) EXPECT_TRUE(r.status.ok()) << r.name << ": " << r.status.message();
    ASSERT_TRUE((*disk)->close().ok());
  }
  std::printf("%s", injector->report().c_str());
  // Events the workload cannot reach: no backing file here.
  const std::vector<BlkDebugEvent> unreachable = {BlkDebugEvent::kReadBackingAio};
  for (unsigned e = 0; e < kBlkDebugEventCount; ++e) {
    auto ev = static_cast<BlkDebugEvent>(e);
    if (std::find(unreachable.begin(), unreachable.end(), ev) != unreachable.end()) continue;
    EXPECT_GT(injector->state(e).events, 0u) << blkdebug_event_name(ev) << " was never announced";
  }
  auto check = run_command({"qemu-img", "check", img});
  EXPECT_EQ(check.exit_code, 0) << check.describe();
  verify_image(img, model, true, "no fault");
}

// The CLI: --inject fails the request with the rule's errno, a once rule
// lets the next request through, and bad rules are refused by key.
TEST(FaultCli, InjectOption) {
  UQ_REQUIRE_TOOL("qemu-img");
  ASSERT_FALSE(uqcow_binary().empty()) << "UQCOW is not set";
  TempDir dir;
  const std::string img = dir.file("cli.qcow2");
  ASSERT_TRUE(Succeeded(run_command({"qemu-img", "create", "-q", "-f", "qcow2", img, "64M"})));
  auto r = run_uqcow({"io", "--inject", "event=write_aio,errno=28,once=on", "-c", "write -P 0x11 0 64k", "-c",
                      "write -P 0x22 1M 64k", img});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(contains_icase(r.out + r.err, "No space left on device")) << r.describe();
  EXPECT_TRUE(contains_icase(r.out, "wrote 65536/65536 bytes at offset 1048576")) << r.describe();
  auto check = run_command({"qemu-img", "check", img});
  EXPECT_TRUE(check.exit_code == 0 || check.exit_code == 3) << check.describe();
  EXPECT_TRUE(Succeeded(run_command({"qemu-io", "-r", "-c", "read -P 0x22 1M 64k", img})));

  for (const char* bad : {"event=nope,errno=5", "event=l2_update,errno=x", "event=l2_update,colour=red",
                                 "errno=5", "event=l2_update,once=maybe"}) {
    auto b = run_uqcow({"io", "--inject", bad, "-c", "read 0 512", img});
    EXPECT_NE(b.exit_code, 0) << bad;
    EXPECT_TRUE(contains_icase(b.err, "inject")) << b.describe();
  }
  auto b = run_uqcow({"io", "--inject", "event=l2_update,colour=red", "-c", "read 0 512", img});
  EXPECT_TRUE(contains_icase(b.err, "colour")) << b.describe();

  for (const std::string_view cmd : {"bench", "convert", "check"}) {
    std::vector<std::string> args = {std::string(cmd), "--inject", "event=read_aio,errno=5"};
    if (cmd == "bench") args.insert(args.end(), {"--rw", "randread", "--count", "4"});
    args.push_back(img);
    if (cmd == "convert") args.insert(args.end(), {"-O", "raw", dir.file("out.raw")});
    auto c = run_uqcow(args);
    EXPECT_FALSE(contains_icase(c.err, "unknown option")) << cmd << " does not take --inject:\n" << c.describe();
  }
}

}  // namespace
}  // namespace uqcow::testing
