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
//
// With persistent dirty bitmaps (issue 15): the matrix runs again (the 18
// events before a change of the file, EIO, once) on the template with an
// enabled bitmap made by qemu-img,
// and BitmapStoreFaults fails the read-write open's and close's own
// requests one by one (they announce no debug event of their own). After
// each case the bitmap is either in use (the open set IN_USE; unusable for
// uqcow and qemu-img alike) or consistent and marking exactly what the
// workload's requests touched (failed ones too, as QEMU marks them); a
// clean close must leave it consistent. The directory always reads
// (qemu-img info), uqcow check counts what qemu-img check counts, and both
// repairs leave the image clean for the other tool.
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
#include "tests/bitmap_oracle.h"
#include "tests/testutil.h"
#include "uring/layered_device.h"

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
  // Marks every modifying request issued from now on in `marks` (the
  // range as an enabled dirty bitmap marks it) and follows resizes.
  void track(BitmapModel* marks) { marks_ = marks; }

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
    mark(off, len);
    std::vector<std::byte> buf(len, std::byte{pattern});
    Status s = disk_.run(disk_.disk().write(off, buf));
    model_.apply(off, len, s.ok(), pattern);
    record("write " + std::to_string(off) + "+" + std::to_string(len), s);
  }
  void write_compressed(uint64_t off, uint64_t len, uint8_t pattern) {
    if (stopped_) return;
    last_offset_ = off;
    mark(off, len);
    std::vector<std::byte> buf(len, std::byte{pattern});
    Status s = disk_.run(image_->write_compressed(off, buf));
    model_.apply(off, len, s.ok(), pattern);
    record("write -c " + std::to_string(off), s);
  }
  void zero(uint64_t off, uint64_t len, bool unmap) {
    if (stopped_) return;
    last_offset_ = off;
    mark(off, len);
    Status s = disk_.run(disk_.disk().write_zeroes(off, len, unmap));
    model_.apply(off, len, s.ok(), 0);
    record("write -z " + std::to_string(off), s);
  }
  void discard(uint64_t off, uint64_t len) {  // cluster aligned: reads back as zeros
    if (stopped_) return;
    last_offset_ = off;
    mark(off, len);
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
    if (stopped_) return;
    Status s = disk_.run(image_->resize(size));
    if (s.ok() && marks_) marks_->resize(size);
    record("resize", std::move(s));
  }
  void mark(uint64_t off, uint64_t len) {
    if (marks_) marks_->mark(off, len);
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
  BitmapModel* marks_ = nullptr;
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
    // The same with bitmap b0 (enabled, 64 KiB granules) added first, so
    // that qemu-io's writes are marked in it (initial_marks()).
    b.create("template-bitmap.qcow2", "qcow2", kCreateOptions, kSize);
    b.run({"qemu-img", "bitmap", "--add", "-g", "64k", "template-bitmap.qcow2", "b0"});
    b.run({"qemu-io", "-c", "write -P 0xa1 0 256k", "-c", "write -c -P 0xa2 256k 8k", "template-bitmap.qcow2"});
    b.run({"qemu-img", "snapshot", "-c", "snap", "template-bitmap.qcow2"});
    ASSERT_TRUE(b.ok()) << b.error();
    template_ = new std::vector<uint8_t>(*read_file(dir_->file("template.qcow2")));
    bitmap_template_ = new std::vector<uint8_t>(*read_file(dir_->file("template-bitmap.qcow2")));
  }
  static void TearDownTestSuite() {
    if (cases_ > 0) std::printf("fault matrix summary (this shard): %d cases, %d fired, %d reported an error, "
                "%d absorbed, %d never reached their event\n",
                cases_, fired_, reported_, absorbed_, unreached_);
    delete template_;
    template_ = nullptr;
    delete bitmap_template_;
    bitmap_template_ = nullptr;
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
  // What b0 of the bitmap template marks.
  static BitmapModel initial_marks() {
    BitmapModel m(kSize, 65536);
    m.mark(0, 256 * 1024 + 8 * 1024);
    return m;
  }
  // One case of the matrix, on the template with or without the bitmap.
  void run_case(int event_index, int err, int mode, bool bitmap);

  static TempDir* dir_;
  static std::vector<uint8_t>* template_;
  static std::vector<uint8_t>* bitmap_template_;
  static int cases_, fired_, reported_, absorbed_, unreached_;
};

TempDir* FaultMatrix::dir_ = nullptr;
std::vector<uint8_t>* FaultMatrix::template_ = nullptr;
std::vector<uint8_t>* FaultMatrix::bitmap_template_ = nullptr;
int FaultMatrix::cases_ = 0, FaultMatrix::fired_ = 0, FaultMatrix::reported_ = 0, FaultMatrix::absorbed_ = 0,
    FaultMatrix::unreached_ = 0;

// Bitmap b0 of an image after a case, before any repair (see the top): the
// directory reads, and b0 is in use, or consistent and exactly `marks`.
// `opened`: the read-write open succeeded; `closed_ok`: so did close.
void verify_bitmap(const std::string& img, const BitmapModel& marks, bool opened, bool closed_ok,
                   const std::string& what) {
  auto qemu = qemu_bitmaps(img);
  ASSERT_TRUE(qemu.has_value()) << what << ": qemu-img info cannot read the image";
  auto autoclear = peek_be64(img, 88);  // the header's autoclear_features; bit 0: bitmaps
  ASSERT_TRUE(autoclear.has_value());
  auto d = SyncDisk::open(img);
  ASSERT_TRUE(d.ok()) << what << ": " << d.error().message();
  auto bits = dynamic_cast<qcow2::Qcow2Image&>((*d)->disk()).dirty_bitmap("b0");
  if (!(*autoclear & 1)) {
    // Only the open clears the bit, while it rewrites the directory in
    // place; the bitmaps are ignored then (their clusters leak), by QEMU too.
    EXPECT_FALSE(opened) << what << ": the autoclear bit is clear after a successful open";
    EXPECT_TRUE(qemu->empty()) << what << ": autoclear bit clear, yet qemu-img lists bitmaps";
    EXPECT_FALSE(bits.ok()) << what;
    if (!bits.ok()) {
      EXPECT_EQ(bits.error().code(), ENOENT) << what << ": " << bits.error().message();
    }
    return;
  }
  const QemuBitmap* q = find_bitmap(*qemu, "b0");
  ASSERT_NE(q, nullptr) << what << ": qemu-img info lists no b0";
  EXPECT_TRUE(q->enabled) << what;
  if (q->in_use) {
    EXPECT_FALSE(closed_ok) << what << ": b0 left in use by a clean close";
    EXPECT_FALSE(bits.ok()) << what << ": qemu-img says b0 is in use, uqcow loads it";
    if (!bits.ok()) {
      EXPECT_EQ(bits.error().code(), EINVAL) << what << ": " << bits.error().message();
    }
    return;
  }
  ASSERT_TRUE(bits.ok()) << what << ": qemu-img says b0 is consistent, uqcow: " << bits.error().message();
  EXPECT_EQ((*bits)->size(), (*d)->size()) << what;
  EXPECT_TRUE(marks.matches(**bits)) << what << ": consistent b0";
}

// Asserts the image is consistent, repairable, and holds the model's data.
// With `bitmaps`, uqcow check must count what qemu-img check counts, and
// its repair must leave no bitmap in use.
void verify_image(const std::string& img, const Model& model, bool closed_ok, const std::string& what,
                  bool bitmaps = false) {
  auto qcheck = run_command({"qemu-img", "check", img});
  EXPECT_TRUE(qcheck.exit_code == 0 || qcheck.exit_code == 3) << what << "\n" << qcheck.describe();
  auto ucheck = run_uqcow({"check", img});
  EXPECT_EQ(ucheck.exit_code, qcheck.exit_code) << what << "\n" << ucheck.describe() << "\n" << qcheck.describe();
  if (bitmaps) {
    EXPECT_EQ(check_counts(ucheck), check_counts(qcheck))
        << what << ": uqcow check " << describe(check_counts(ucheck)) << ", qemu-img check "
        << describe(check_counts(qcheck)) << "\n" << ucheck.describe() << "\n" << qcheck.describe();
  }
  EXPECT_TRUE(Succeeded(run_uqcow({"check", "-q", "-r", "all", img}))) << what;
  auto after = run_command({"qemu-img", "check", img});
  EXPECT_EQ(after.exit_code, 0) << what << ": not clean after uqcow check -r all\n" << after.describe();
  if (bitmaps) {
    auto left = qemu_bitmaps(img);
    ASSERT_TRUE(left.has_value()) << what << ": qemu-img info cannot read the repaired image";
    for (const auto& b : *left) EXPECT_FALSE(b.in_use) << what << ": uqcow check -r all kept " << b.name << " in use";
  }

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

void FaultMatrix::run_case(int event_index, int err, int mode, bool bitmap) {
  ASSERT_NE(template_, nullptr);
  const bool once = mode != kAlways;
  const auto event = static_cast<BlkDebugEvent>(event_index);
  const std::string rule_text = "event=" + std::string(blkdebug_event_name(event)) + ",errno=" +
                                std::to_string(err) + (once ? ",once=on" : "");
  const std::string img = dir_->file(std::string(blkdebug_event_name(event)) + "-" + std::to_string(err) + "-" +
                                     kModeNames[mode] + (bitmap ? "-bitmap" : "") + ".qcow2");
  ASSERT_TRUE(write_file(img, bitmap ? *bitmap_template_ : *template_));
  BitmapModel marks = initial_marks();

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
      if (bitmap) w.track(&marks);
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
  const std::string what = "rule " + rule_text + " (" + kModeNames[mode] + (bitmap ? ", bitmap" : "") + ")";
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
  if (bitmap) verify_bitmap(img, marks, opened, close_status.ok() && opened, what);
  verify_image(img, model, close_status.ok() && opened, what, bitmap);
  std::remove(img.c_str());
  const auto t2 = std::chrono::steady_clock::now();
  using ms = std::chrono::milliseconds;
  std::printf("  workload %lld ms, checks %lld ms\n", static_cast<long long>(std::chrono::duration_cast<ms>(t1 - t0).count()),
              static_cast<long long>(std::chrono::duration_cast<ms>(t2 - t1).count()));
}

TEST_P(FaultMatrix, WorkloadSurvivesFault) {
  UQ_REQUIRE_TOOL("qemu-img");
  UQ_REQUIRE_TOOL("qemu-io");
  const auto [event_index, err, mode] = GetParam();
  run_case(event_index, err, mode, false);
}

// The same workload and rules, on the template with bitmap b0: EIO, once
// (close then stores the bitmap, marking the failed request too). Rules
// that fail every later request leave it in use as the open set it; that
// and faults inside the open and the close are BitmapStoreFaults' part.
class FaultMatrixBitmap : public FaultMatrix {};

TEST_P(FaultMatrixBitmap, BitmapSurvivesFault) {
  UQ_REQUIRE_TOOL("qemu-img");
  UQ_REQUIRE_TOOL("qemu-io");
  const auto [event_index, err, mode] = GetParam();
  run_case(event_index, err, mode, true);
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
// The events before the file is changed (the read and load events only fail
// reads, which mark nothing).
std::vector<int> changing_events() {
  std::vector<int> out;
  for (const char* name : {"l1_update", "l1_grow_write_table", "l1_shrink_write_table", "l2_update",
                           "l2_update_compressed", "l2_alloc_write", "write_aio", "write_compressed", "cow_write",
                           "reftable_grow", "refblock_update", "refblock_alloc_write", "refblock_alloc_switch_table",
                           "cluster_alloc", "cluster_free", "flush_to_disk", "pwritev_zero", "snapshot_update"}) {
    out.push_back(static_cast<int>(*parse_blkdebug_event(name)));
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(ChangingEvents, FaultMatrixBitmap,
                         ::testing::Combine(::testing::ValuesIn(changing_events()), ::testing::Values(EIO),
                                            ::testing::Values(kOnce)),
                         case_name);

// Fails the image file's requests by count: the bitmap code of open and
// close announces no debug event of its own. While armed, every request
// that changes the file or flushes it is counted; the `fail_at`-th fails
// with EIO, and with `dead` every later one too.
struct CountedFaults {
  uint64_t fail_at = 0;  // 0: none (a counting run)
  bool dead = false;
  bool armed = false;
  uint64_t seen = 0;
  uint64_t failed = 0;
  std::vector<std::string> requests;  // what each counted request was
};

class CountedFaultDevice final : public LayeredBlockDevice {
 public:
  CountedFaultDevice(std::unique_ptr<BlockDevice> inner, std::shared_ptr<CountedFaults> plan)
      : LayeredBlockDevice(std::move(inner)), plan_(std::move(plan)) {}

  Task<Status> co_write(uint64_t offset, std::span<const std::byte> buf) override {
    UQ_CO_TRY(fault("write", offset, buf.size()));
    co_return co_await inner().co_write(offset, buf);
  }
  Task<Status> co_writev(uint64_t offset, std::span<iovec> iov) override {
    uint64_t len = 0;
    for (const iovec& v : iov) len += v.iov_len;
    UQ_CO_TRY(fault("write", offset, len));
    co_return co_await inner().co_writev(offset, iov);
  }
  Task<Status> co_flush() override {
    UQ_CO_TRY(fault("flush", 0, 0));
    co_return co_await inner().co_flush();
  }
  Task<Status> co_discard(uint64_t offset, uint64_t len) override {
    UQ_CO_TRY(fault("discard", offset, len));
    co_return co_await inner().co_discard(offset, len);
  }
  Task<Status> co_write_zeroes(uint64_t offset, uint64_t len, bool may_unmap) override {
    UQ_CO_TRY(fault("write zeroes", offset, len));
    co_return co_await inner().co_write_zeroes(offset, len, may_unmap);
  }

 private:
  Status fault(const char* what, uint64_t offset, uint64_t len) {
    CountedFaults& p = *plan_;
    if (!p.armed) return Status();
    ++p.seen;
    p.requests.push_back(std::string(what) + (len ? " " + std::to_string(len) + " bytes at " + std::to_string(offset) : ""));
    if (p.fail_at == 0 || p.seen < p.fail_at || (p.seen > p.fail_at && !p.dead)) return Status();
    ++p.failed;
    return Error(EIO, std::string(what) + " " + std::to_string(p.seen) + " failed by injected fault");
  }

  std::shared_ptr<CountedFaults> plan_;
};

// Each request the read-write open and the close of an image with bitmaps
// make (IN_USE set in place; the bitmaps' data clusters, tables, directory
// and header written, the old ones freed, the caches flushed) fails in turn,
// once or for good. In between, the bitmaps change: b0 (enabled, 512-byte
// granules: a table of eight entries) and b2 track writes, b2 is removed
// and b3 added. After each case the directory is the old one (every bitmap
// in use as the open left it, or as before if the open failed first) or
// the new one (b0, b1, b3 consistent and exact), never anything else; uqcow check counts what qemu-img check
// counts, and (when every request from the failed one on fails, for every
// other such request) both repairs leave the image clean for the other tool.
TEST(BitmapStoreFaults, OldOrNewBitmapsAfterEveryFailedRequest) {
  for (const char* tool : {"qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"}) UQ_REQUIRE_TOOL(tool);
  TempDir dir("store_faults");
  ImageBuilder b(dir.path());
  b.create("template.qcow2", "qcow2", "cluster_size=512", kSize);
  b.run({"qemu-img", "bitmap", "--add", "-g", "512", "template.qcow2", "b0"});
  b.run({"qemu-img", "bitmap", "--add", "-g", "64k", "template.qcow2", "b1"});
  b.run({"qemu-img", "bitmap", "--add", "-g", "4k", "template.qcow2", "b2"});
  b.write("template.qcow2", "qcow2", {P(0, 4096, 0xb1), P(6ull << 20, 512, 0xb2)});
  b.run({"qemu-img", "bitmap", "--disable", "template.qcow2", "b1"});
  ASSERT_TRUE(b.ok()) << b.error();
  const std::vector<uint8_t> start = *read_file(dir.file("template.qcow2"));
  const std::string img = dir.file("case.qcow2");

  // The bitmaps the template holds (old) and the workload leaves (new).
  BitmapModel old_b0(kSize, 512), b1(kSize, 65536), old_b2(kSize, 4096), b3(kSize, 65536);
  for (BitmapModel* m : {&old_b0, &b1, &old_b2}) {
    m->mark(0, 4096);
    m->mark(6ull << 20, 512);
  }
  BitmapModel b0 = old_b0;
  struct Request {
    uint64_t offset, length;
    enum { kWrite, kZero, kDiscard } kind;
  };
  const std::vector<Request> before_add = {
      {0, 4096, Request::kWrite},        {(3ull << 20) + 100, 5000, Request::kWrite},
      {8ull << 20, 65536, Request::kZero}, {12ull << 20, 65536, Request::kDiscard},
      {15ull << 20, 512, Request::kWrite}};
  const std::vector<Request> after_add = {{1ull << 20, 4096, Request::kWrite}};
  for (const auto& r : before_add) b0.mark(r.offset, r.length);
  for (const auto& r : after_add) {
    b0.mark(r.offset, r.length);
    b3.mark(r.offset, r.length);
  }

  // Runs the workload with `plan`, arming it from the open or at close.
  // Returns whether the open and the close succeeded.
  uint64_t seen_in_open = 0;
  auto run = [&](std::shared_ptr<CountedFaults> plan, bool from_open) -> std::pair<bool, bool> {
    EXPECT_TRUE(write_file(img, start));
    OpenOptions o;
    o.read_only = false;
    o.cache_clean_interval = 0;
    o.wrap_file = [plan](std::unique_ptr<BlockDevice> inner) -> Result<std::unique_ptr<BlockDevice>> {
      return std::unique_ptr<BlockDevice>(std::make_unique<CountedFaultDevice>(std::move(inner), plan));
    };
    plan->armed = from_open;
    auto d = SyncDisk::open(img, o);
    seen_in_open = plan->seen;
    if (!d.ok()) return {false, false};
    auto& q = dynamic_cast<qcow2::Qcow2Image&>((*d)->disk());
    auto issue = [&](const std::vector<Request>& list) {
      for (const auto& r : list) {
        std::vector<std::byte> data(r.length, std::byte{0x5c});
        Status s = r.kind == Request::kWrite  ? (*d)->run(q.write(r.offset, data))
                   : r.kind == Request::kZero ? (*d)->run(q.write_zeroes(r.offset, r.length, false))
                                              : (*d)->run(q.discard(r.offset, r.length));
        EXPECT_TRUE(s.ok()) << "the workload runs without faults: " << s.message();
      }
    };
    issue(before_add);
    EXPECT_TRUE(q.bitmap_remove("b2").ok());
    EXPECT_TRUE(q.bitmap_add("b3", 65536, true).ok());
    issue(after_add);
    EXPECT_TRUE((*d)->run(q.flush()).ok());
    plan->armed = true;
    return {true, (*d)->close().ok()};
  };

  // How many requests the open and the close make.
  auto counting = std::make_shared<CountedFaults>();
  auto [opened, closed] = run(counting, true);
  ASSERT_TRUE(opened && closed);
  const uint64_t open_requests = seen_in_open;
  const std::vector<std::string> open_log(counting->requests.begin(), counting->requests.begin() + open_requests);
  counting = std::make_shared<CountedFaults>();
  run(counting, false);
  const uint64_t close_requests = counting->seen;
  const std::vector<std::string> close_log = counting->requests;
  for (const auto& [phase, log] : {std::pair{"open", &open_log}, std::pair{"close", &close_log}}) {
    std::printf("%s's requests:", phase);
    for (size_t i = 0; i < log->size(); ++i) std::printf(" %zu. %s;", i + 1, (*log)[i].c_str());
    std::printf("\n");
  }
  ASSERT_GT(open_requests, 0u);
  ASSERT_GT(close_requests, 0u);
  // The clean run's result, by QEMU's reading.
  for (const auto& [name, model] : {std::pair{"b0", &b0}, std::pair{"b1", &b1}, std::pair{"b3", &b3}}) {
    auto exported = qemu_dirty_extents(img, name);
    if (exported) {
      EXPECT_EQ(*exported, model->extents()) << name << " after a clean close, as qemu-nbd exports it";
    }
  }

  int old_state = 0, new_state = 0, ignored = 0, cases = 0, failed_cases = 0;
  // `repairs`: run both repairs too (else only compare the check counts).
  auto verify = [&](bool opened, bool closed, bool repairs, const std::string& what) {
    ++cases;
    auto qemu = qemu_bitmaps(img);
    ASSERT_TRUE(qemu.has_value()) << what << ": qemu-img info cannot read the image";
    auto d = SyncDisk::open(img);
    ASSERT_TRUE(d.ok()) << what << ": " << d.error().message();
    auto& q = dynamic_cast<qcow2::Qcow2Image&>((*d)->disk());
    std::string names;
    for (const auto& bm : *qemu) names += bm.name + (bm.in_use ? "(in use) " : " ");
    if (qemu->empty()) {
      // The open failed between clearing and setting the autoclear bit.
      ++ignored;
      EXPECT_FALSE(opened) << what;
      EXPECT_EQ(peek_be64(img, 88).value_or(1) & 1, 0u) << what << ": no bitmaps listed, autoclear bit set";
      EXPECT_EQ(q.dirty_bitmap("b0").error().code(), ENOENT) << what;
    } else if (find_bitmap(*qemu, "b2")) {
      // In use, or (the open failed before setting IN_USE) as they were.
      ++old_state;
      EXPECT_FALSE(closed) << what << ": a clean close left the old directory: " << names;
      ASSERT_EQ(qemu->size(), 3u) << what << ": " << names;
      for (const auto& [name, model] : {std::pair{"b0", &old_b0}, std::pair{"b1", &b1}, std::pair{"b2", &old_b2}}) {
        const QemuBitmap* bm = find_bitmap(*qemu, name);
        ASSERT_NE(bm, nullptr) << what << ": no " << name << " in " << names;
        auto bits = q.dirty_bitmap(name);
        if (bm->in_use) {
          EXPECT_FALSE(bits.ok()) << what << ": qemu-img says " << name << " is in use, uqcow loads it";
          continue;
        }
        EXPECT_FALSE(opened) << what << ": " << name << " consistent in the old directory after a successful open";
        ASSERT_TRUE(bits.ok()) << what << ": " << bits.error().message();
        EXPECT_TRUE(model->matches(**bits)) << what << ": " << name;
      }
    } else {
      ++new_state;
      ASSERT_EQ(qemu->size(), 3u) << what << ": " << names;
      for (const auto& [name, model] : {std::pair{"b0", &b0}, std::pair{"b1", &b1}, std::pair{"b3", &b3}}) {
        const QemuBitmap* bm = find_bitmap(*qemu, name);
        ASSERT_NE(bm, nullptr) << what << ": no " << name << " in " << names;
        EXPECT_FALSE(bm->in_use) << what << ": " << names;
        auto bits = q.dirty_bitmap(name);
        ASSERT_TRUE(bits.ok()) << what << ": " << bits.error().message();
        EXPECT_TRUE(model->matches(**bits)) << what << ": " << name;
      }
    }
    EXPECT_TRUE((*d)->close().ok()) << what;
    auto qcheck = run_command({"qemu-img", "check", img});
    EXPECT_TRUE(qcheck.exit_code == 0 || qcheck.exit_code == 3) << what << "\n" << qcheck.describe();
    if (repairs) {
      checks_agree_and_repair(img, qcheck, what);
    } else {
      counts_agree(img, qcheck, what);
    }
  };

  for (bool from_open : {true, false}) {
    const uint64_t n = from_open ? open_requests : close_requests;
    for (uint64_t k = 1; k <= n; ++k) {
      for (bool dead : {false, true}) {
        if (from_open && !dead) continue;  // a failed open ends there either way
        auto plan = std::make_shared<CountedFaults>();
        plan->fail_at = k;
        plan->dead = dead;
        auto [opened, closed] = run(plan, from_open);
        const std::string what = std::string(from_open ? "open" : "close") + " request " + std::to_string(k) + "/" +
                                 std::to_string(n) + " (" + (from_open ? open_log : close_log)[k - 1] + ")" +
                                 (dead ? " and every later one" : "") + " failed";
        SCOPED_TRACE(what);
        EXPECT_GT(plan->failed, 0u) << what << ": the fault never fired";
        // A discard of freed clusters is advisory: its failure may go unreported.
        const bool advisory = (from_open ? open_log : close_log)[k - 1].starts_with("discard");
        if (!advisory) {
          EXPECT_FALSE(opened && closed) << what << ": the failure was not reported";
        }
        const int failures_before = failures_so_far();
        verify(opened, closed, dead && k % 2 == 1, what);
        if (failures_so_far() != failures_before && ++failed_cases == 3) return;  // enough stories
      }
    }
  }
  std::printf("bitmap store faults: %llu requests in the open, %llu in the close; %d cases: %d left the old "
              "directory (in use), %d the new one, %d the bitmaps ignored\n",
              static_cast<unsigned long long>(open_requests), static_cast<unsigned long long>(close_requests), cases,
              old_state, new_state, ignored);
}

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
