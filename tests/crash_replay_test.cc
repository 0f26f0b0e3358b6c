// Crash-consistency replay. A workload of random allocating writes, zero
// writes, discards, refcount table growth and snapshot create/delete runs on
// an image whose file is wrapped in a RecordingDevice (fault/), which logs
// every write, write-zeroes, discard, truncate and flush with its data.
//
// A crash at log time t could leave on disk: every change that completed
// before the last flush that completed before t (the base), plus any subset
// of the changes issued after that flush started, some of them torn at
// 512-byte sector boundaries. Overlapping changes that do reach the disk do
// so in issue order (a later write of a block supersedes an earlier one in
// the cache); non-overlapping ones in any order (the subset models that).
//
// For each such image: qemu-img check reports no corruption (exit 0 or 3),
// and every guest write acknowledged before the last completed guest flush
// reads back intact (bytes touched by later requests are not checked). With
// lazy refcounts the image is left dirty; opening it read-write through
// uqcow repairs it, and then qemu-img check must be clean.
//
// One exception, inherent to the format and shared with QEMU: while a
// snapshot is created, a cluster's refcount (2) and its entry's OFLAG_COPIED
// (cleared) live in different sectors, so one reaches the disk first. The
// refcount goes first (the safe order: COPIED never promises refcount 1 of a
// shared cluster), and a crash in between leaves entries that still say
// COPIED at refcount 2, which qemu-img check counts as errors. They are
// harmless as long as the extra reference is a leak (the snapshot table
// never pointed at it): in-place writes then touch no snapshot's data. Such
// images are accepted only if every error is of that kind (or the opposite,
// COPIED missing at refcount 1, which only costs a needless copy) and
// `uqcow check -r all` then leaves them clean.
//
// Persistent dirty bitmaps (issue 15): two more layouts start from an image
// with two bitmaps made by qemu-img, b0 enabled (512-byte granules) and b1
// disabled (64 KiB), both with bits set. A read-write open sets IN_USE on
// disk before any write, and close stores them; so a crash image's bitmap
// is either in use (unusable: dirty_bitmap() says EINVAL, qemu-img info
// says in-use) or consistent, and then exactly what it was before the open
// (a crash inside the open) or the whole workload marked (a crash after
// close's header write): never consistent and missing a write that may
// have reached the disk. A crash between open's clearing and setting of
// the autoclear bit leaves the bitmaps ignored (QEMU ignores them too;
// their clusters leak). Per image: uqcow and qemu-img info agree on that
// state, uqcow check reports the same corruption and leak counts as
// qemu-img check, `uqcow check -r all` leaves it clean for qemu-img (the
// bitmaps in use removed), and after `qemu-img check -r all` (which keeps
// them) uqcow check finds it clean too (these two on every fourth image). A
// quarter of these crash points fall inside the open and a quarter inside
// the close.
//
// 320 images run by default for the plain and lazy-refcount layouts (2
// layouts x 4 batches x 40), 24 with bitmaps (2 layouts x 1 batch x 12);
// UQCOW_CRASH_IMAGES=N runs N per layout for a longer run by hand, e.g.
// (about 10 minutes per 1000 images and layout on 2 cores):
//   bazel test //tests:crash_replay_test --test_env=UQCOW_CRASH_IMAGES=5000
//       --test_timeout=7200 --test_output=all  (one command line)
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "block/endian.h"
#include "engine/sync_wait.h"
#include "fault/recording_device.h"
#include "qcow2/image.h"
#include "tests/bitmap_oracle.h"
#include "tests/testutil.h"
#include "uring/raw_file.h"
#include "uring/reactor.h"

namespace uqcow::testing {
namespace {

constexpr uint64_t kDiskSize = 8ull << 20;
constexpr uint64_t kSector = 512;
constexpr int kBatches = 4;            // tests per layout (run on separate shards)
constexpr int kDefaultImagesPerBatch = 40;
constexpr int kBitmapBatches = 1;  // the same with bitmaps, fewer images (each runs more processes)
constexpr int kDefaultBitmapImagesPerBatch = 12;

enum class Layout { kPlain, kLazy, kBitmaps, kLazyBitmaps };
bool lazy_layout(Layout l) { return l == Layout::kLazy || l == Layout::kLazyBitmaps; }
bool bitmap_layout(Layout l) { return l == Layout::kBitmaps || l == Layout::kLazyBitmaps; }
const char* layout_name(Layout l) {
  switch (l) {
    case Layout::kPlain: return "plain";
    case Layout::kLazy: return "lazy";
    case Layout::kBitmaps: return "bitmaps";
    case Layout::kLazyBitmaps: return "lazy_bitmaps";
  }
  return "?";
}

// The bitmaps of the bitmap layouts, and what qemu-io marked in them before
// the workload: b0 saw both zero writes, b1 was disabled after the first.
struct StartingBitmap {
  const char* name;
  uint64_t granularity;
  bool enabled;  // when the workload runs
  std::vector<std::pair<uint64_t, uint64_t>> marked;
};
const std::vector<StartingBitmap>& starting_bitmaps() {
  static const std::vector<StartingBitmap> bitmaps = {
      {"b0", 512, true, {{0, 65536}, {5ull << 20, 4096}, {7ull << 20, 512}}},
      {"b1", 65536, false, {{0, 65536}, {5ull << 20, 4096}}},
  };
  return bitmaps;
}

// A guest request of the workload, with the log clock around it.
struct GuestOp {
  enum Kind { kWrite, kZero, kDiscard, kFlush, kSnapshot } kind;
  uint64_t offset = 0, length = 0;
  uint8_t pattern = 0;
  uint64_t start = 0, end = 0;  // WriteLog clock before and after
  uint64_t marked_offset = 0, marked_length = 0;  // the request's range, as bitmaps mark it
};

struct Recording {
  std::vector<uint8_t> initial;  // the file before the image was opened
  std::shared_ptr<WriteLog> log = std::make_shared<WriteLog>();
  std::vector<GuestOp> guest;
  uint64_t opened = 0;   // WriteLog clock when the open returned
  uint64_t closing = 0;  // ... and when close started
};

// Runs the workload on `path` through a RecordingDevice.
Status record_workload(const std::string& path, bool lazy, uint32_t seed, Recording& rec) {
  auto initial = read_file(path);
  if (!initial) return Error(EIO, "cannot read " + path);
  rec.initial = std::move(*initial);
  UQ_ASSIGN_OR_RETURN(auto reactor, uring::Reactor::create());
  UQ_ASSIGN_OR_RETURN(auto file, RawFile::open(path, {.read_only = false}));
  auto device = std::make_unique<RecordingDevice>(std::move(file), rec.log);
  OpenOptions o;
  o.read_only = false;
  o.l2_cache_size = 4096;
  o.refcount_cache_size = 4096;
  o.cache_clean_interval = 0;
  o.lazy_refcounts = lazy;
  auto opener = [](const std::string&, const std::string&) -> Task<Result<std::unique_ptr<Disk>>> {
    co_return Error(ENOTSUP, "no backing files here");
  };
  UQ_ASSIGN_OR_RETURN(auto img, sync_wait(*reactor, qcow2::Qcow2Image::open(std::move(device), o, opener)));
  qcow2::Qcow2Image& image = *img;
  rec.opened = rec.log->tick();

  std::mt19937 rng(seed);
  auto uniform = [&](uint64_t lo, uint64_t hi) { return std::uniform_int_distribution<uint64_t>(lo, hi)(rng); };
  auto run = [&](GuestOp op, Task<Status> task) -> Status {
    op.marked_offset = op.offset;
    op.marked_length = op.length;
    op.start = rec.log->tick();
    Status s = sync_wait(*reactor, std::move(task));
    op.end = rec.log->tick();
    if (s.ok()) rec.guest.push_back(op);
    return s;
  };
  std::vector<std::vector<std::byte>> buffers;
  auto write = [&](uint64_t off, uint64_t len) -> Status {
    GuestOp op{GuestOp::kWrite, off, len, static_cast<uint8_t>(uniform(1, 255))};
    buffers.emplace_back(len, std::byte{op.pattern});
    return run(op, image.write(off, buffers.back()));
  };
  int snapshots = 0;
  for (int step = 0; step < 140; ++step) {
    Status s;
    const uint64_t r = uniform(0, 99);
    if (step == 60) {
      // A long sequential write: the file passes 2 MiB, the refcount table grows.
      s = write(4ull << 20, 2ull << 20);
    } else if (step == 40 || step == 100) {
      std::string name = "s" + std::to_string(++snapshots);
      s = run({GuestOp::kSnapshot}, image.snapshot_create(name));
    } else if (step == 120) {
      s = run({GuestOp::kSnapshot}, image.snapshot_delete("s1"));
    } else if (r < 60) {
      // Unaligned sometimes: copy-on-write of the head and tail clusters.
      uint64_t len = uniform(1, 24) * kSector - (r % 3 == 0 ? uniform(1, 300) : 0);
      s = write(uniform(0, (kDiskSize - len) / kSector) * kSector + (r % 4 == 0 ? uniform(1, 511) : 0), len);
    } else if (r < 72) {
      uint64_t len = uniform(1, 16) * kSector;
      uint64_t off = uniform(0, (kDiskSize - len) / kSector) * kSector;
      s = run({GuestOp::kZero, off, len}, image.write_zeroes(off, len, r % 2 == 0));
    } else if (r < 82) {
      uint64_t len = uniform(1, 16) * kSector;
      uint64_t off = uniform(0, (kDiskSize - len) / kSector) * kSector;
      s = run({GuestOp::kDiscard, off, len}, image.discard(off, len));
    } else {
      s = run({GuestOp::kFlush}, image.flush());
    }
    if (!s.ok()) return s.error();
  }
  UQ_TRY(run({GuestOp::kFlush}, image.flush()));
  // Closing writes nothing more for a clean image without bitmaps (and
  // clears the dirty bit of a lazy-refcounts one); it stores the bitmaps.
  rec.closing = rec.log->tick();
  return sync_wait(*reactor, image.close());
}

// The file a crash at log time t might leave, drawn with `rng`.
std::vector<uint8_t> crash_image(const Recording& rec, uint64_t t, std::mt19937& rng, int& torn,
                                 int& partial_ops) {
  const auto& ops = rec.log->ops();
  uint64_t barrier = 0;  // issue time of the last flush completed by t
  for (const auto& op : ops) {
    if (op.kind == RecordedOp::Kind::kFlush && op.ok && op.completed && op.completed <= t) {
      barrier = std::max(barrier, op.issued);
    }
  }
  std::vector<uint8_t> file = rec.initial;
  auto apply = [&](const RecordedOp& op, uint64_t from, uint64_t to) {  // bytes [from, to) of op
    if (op.kind == RecordedOp::Kind::kTruncate) {
      file.resize(op.length);
      return;
    }
    // Writes extend the file; zeroing and discarding past its end do not.
    const uint64_t end = op.offset + to;
    if (file.size() < end && op.kind == RecordedOp::Kind::kWrite) file.resize(end);
    const uint64_t at = op.offset + from, stop = std::min<uint64_t>(end, file.size());
    if (at >= stop) return;
    if (op.kind == RecordedOp::Kind::kWrite) {
      std::memcpy(&file[at], &op.data[from], stop - at);
    } else {
      std::memset(&file[at], 0, stop - at);
    }
  };
  std::bernoulli_distribution keep(0.5), tear(0.25), sector(0.5);
  for (const auto& op : ops) {
    if (op.kind == RecordedOp::Kind::kFlush || op.issued >= t) continue;
    const bool durable = op.completed && op.completed < barrier;
    if (durable) {
      apply(op, 0, op.length);
      continue;
    }
    if (!keep(rng)) continue;
    ++partial_ops;
    if (op.kind == RecordedOp::Kind::kTruncate || op.length <= kSector || !tear(rng)) {
      apply(op, 0, op.length);
      continue;
    }
    // Torn: only some of the sectors (on the file's 512-byte grid) land.
    ++torn;
    uint64_t from = 0;
    while (from < op.length) {
      uint64_t to = std::min(op.length, (op.offset + from) / kSector * kSector + kSector - op.offset);
      if (sector(rng)) apply(op, from, to);
      from = to;
    }
  }
  return file;
}

// The guest bytes that must read back as `expect` after a crash at t; the
// mask is 0 for bytes a request in flight or after the barrier touched.
void guest_expectation(const Recording& rec, uint64_t t, std::vector<uint8_t>& expect, std::vector<uint8_t>& mask) {
  uint64_t barrier = 0;  // start of the last guest flush completed by t
  for (const auto& op : rec.guest) {
    if (op.kind == GuestOp::kFlush && op.end <= t) barrier = std::max(barrier, op.start);
  }
  expect.assign(kDiskSize, 0);
  mask.assign(kDiskSize, 1);
  for (const auto& op : rec.guest) {
    if (op.kind == GuestOp::kFlush || op.kind == GuestOp::kSnapshot || op.start >= t) continue;
    const bool acknowledged = op.end < barrier;
    if (acknowledged) {
      std::memset(&expect[op.offset], op.kind == GuestOp::kWrite ? op.pattern : 0, op.length);
      std::memset(&mask[op.offset], 1, op.length);
    } else {
      std::memset(&mask[op.offset], 0, op.length);
    }
  }
}

// Discards leave partial clusters alone: the guest range of a discard is
// only zero where it covers whole clusters. Narrow such ops to that.
void align_discards(Recording& rec, uint64_t cluster) {
  for (auto& op : rec.guest) {
    if (op.kind != GuestOp::kDiscard) continue;
    uint64_t a = (op.offset + cluster - 1) / cluster * cluster, b = (op.offset + op.length) / cluster * cluster;
    op.offset = a;
    op.length = b > a ? b - a : 0;
  }
}

// Whether every error qemu-img check reported is a harmless OFLAG_COPIED
// mismatch (see the top of the file). `cluster_bits` maps entries to
// cluster indices.
bool only_harmless_copied_errors(const CommandResult& check, unsigned cluster_bits) {
  static const std::regex leaked(R"(Leaked cluster (\d+) refcount=(\d+) reference=(\d+))");
  static const std::regex copied(R"(ERROR OFLAG_COPIED (?:L2|data) cluster: (?:l1_index=\d+ l1_entry|l2_entry)=([0-9a-f]+) refcount=(\d+))");
  static const std::regex errors(R"((\d+) errors were found on the image)");
  const std::string text = check.out + "\n" + check.err;
  std::map<uint64_t, uint64_t> references;  // leaked cluster -> real references
  for (std::sregex_iterator it(text.begin(), text.end(), leaked), end; it != end; ++it) {
    references[std::stoull((*it)[1])] = std::stoull((*it)[3]);
  }
  uint64_t harmless = 0;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    if (line.find("ERROR") == std::string::npos) continue;
    std::smatch m;
    if (!std::regex_search(line, m, copied)) return false;
    const uint64_t cluster = (std::stoull(m[1], nullptr, 16) & 0x00fffffffffffe00ull) >> cluster_bits;
    const uint64_t refcount = std::stoull(m[2]);
    auto ref = references.find(cluster);
    if (refcount != 1 && (ref == references.end() || ref->second != 1)) return false;
    ++harmless;
  }
  std::smatch m;
  return std::regex_search(text, m, errors) && std::stoull(m[1]) == harmless;
}

// Whether the bitmaps of crash image `bytes` (written at `crash`), crashed
// at log time t, are in one of the states the top of the file allows, as
// uqcow and qemu-img info both see them. Counts what it found in `tally`.
struct BitmapTally {
  int in_use = 0, before_open = 0, stored = 0, ignored = 0, nbd_compared = 0;
};
bool check_crash_bitmaps(const std::string& crash, const std::vector<uint8_t>& bytes, const Recording& rec,
                         uint64_t t, const std::string& where, BitmapTally& tally) {
  const int before = failures_so_far();
  const bool autoclear = load_be64(&bytes[88]) & 1;  // the header's autoclear_features, bit 0: bitmaps
  auto qemu = qemu_bitmaps(crash);
  if (!qemu) {
    ADD_FAILURE() << where << ": qemu-img info cannot read the image";
    return false;
  }
  auto d = SyncDisk::open(crash);  // read-only: the crash image stays as it is
  if (!d.ok()) {
    ADD_FAILURE() << where << ": " << d.error().message();
    return false;
  }
  auto& image = dynamic_cast<qcow2::Qcow2Image&>((*d)->disk());
  if (!autoclear) {
    // Only the open clears the bit, for the moment it rewrites the directory.
    ++tally.ignored;
    EXPECT_LE(t, rec.opened) << where << ": bitmaps extension ignored (autoclear bit clear) after the open";
    EXPECT_TRUE(qemu->empty()) << where << ": autoclear bit clear, yet qemu-img lists bitmaps";
  }
  for (const StartingBitmap& sb : starting_bitmaps()) {
    auto bits = image.dirty_bitmap(sb.name);
    if (!autoclear) {
      EXPECT_FALSE(bits.ok()) << where << ": bitmap " << sb.name << " loaded while the autoclear bit is clear";
      if (!bits.ok()) {
        EXPECT_EQ(bits.error().code(), ENOENT) << where << ": " << bits.error().message();
      }
      continue;
    }
    const QemuBitmap* q = find_bitmap(*qemu, sb.name);
    if (!q) {
      ADD_FAILURE() << where << ": qemu-img info does not list bitmap " << sb.name;
      continue;
    }
    EXPECT_EQ(q->enabled, sb.enabled) << where << ": " << sb.name;
    EXPECT_EQ(q->granularity, sb.granularity) << where << ": " << sb.name;
    if (q->in_use) {
      ++tally.in_use;
      EXPECT_FALSE(bits.ok()) << where << ": qemu-img says " << sb.name << " is in use, uqcow loads it as usable";
      if (!bits.ok()) {
        EXPECT_EQ(bits.error().code(), EINVAL) << where << ": " << bits.error().message();
      }
      continue;
    }
    if (!bits.ok()) {
      ADD_FAILURE() << where << ": qemu-img says " << sb.name << " is consistent, uqcow: " << bits.error().message();
      continue;
    }
    // Consistent: before the open marked it in use, or stored by close.
    EXPECT_TRUE(t <= rec.opened || t >= rec.closing)
        << where << ": " << sb.name << " is consistent after a crash in the middle of the workload (open ended at "
        << rec.opened << ", close began at " << rec.closing << ")";
    ++(t <= rec.opened ? tally.before_open : tally.stored);
    BitmapModel model(kDiskSize, sb.granularity);
    for (const auto& [off, len] : sb.marked) model.mark(off, len);
    if (sb.enabled) {
      for (const auto& op : rec.guest) {
        const bool changes = op.kind == GuestOp::kWrite || op.kind == GuestOp::kZero || op.kind == GuestOp::kDiscard;
        if (changes && op.start < t) model.mark(op.marked_offset, op.marked_length);
      }
    }
    EXPECT_TRUE(model.matches(**bits)) << where << ": consistent bitmap " << sb.name;
    // QEMU's view of the same bits, for a few of them (a qemu-nbd each).
    if (sb.enabled && tally.nbd_compared < 2) {
      ++tally.nbd_compared;
      auto exported = qemu_dirty_extents(crash, sb.name);
      if (exported) {
        EXPECT_EQ(*exported, model.extents()) << where << ": " << sb.name << " as qemu-nbd exports it";
      }
    }
  }
  return failures_so_far() == before;
}

int images_per_batch(bool bitmaps) {
  if (const char* env = std::getenv("UQCOW_CRASH_IMAGES")) {
    int n = std::atoi(env);
    if (n > 0) return std::max(1, n / (bitmaps ? kBitmapBatches : kBatches));
  }
  return bitmaps ? kDefaultBitmapImagesPerBatch : kDefaultImagesPerBatch;
}

class CrashReplay : public ::testing::TestWithParam<std::tuple<Layout, int>> {};

TEST_P(CrashReplay, EveryCrashImageIsConsistent) {
  UQ_REQUIRE_TOOL("qemu-img");
  const auto [layout, batch] = GetParam();
  const bool lazy = lazy_layout(layout), bitmaps = bitmap_layout(layout);
  if (bitmaps) {
    UQ_REQUIRE_TOOL("qemu-io");
    UQ_REQUIRE_TOOL("qemu-nbd");
    UQ_REQUIRE_TOOL("nbdinfo");
  }
  TempDir dir("replay");
  const std::string img = dir.file("workload.qcow2");
  ImageBuilder b(dir.path());
  b.create("workload.qcow2", "qcow2", std::string("cluster_size=512,refcount_bits=64") + (lazy ? ",lazy_refcounts=on" : ""),
           kDiskSize);
  if (bitmaps) {
    // Zero writes (the guest still reads zeros) marked by qemu-io; see
    // starting_bitmaps().
    b.run({"qemu-img", "bitmap", "--add", "-g", "512", "workload.qcow2", "b0"});
    b.run({"qemu-img", "bitmap", "--add", "-g", "64k", "workload.qcow2", "b1"});
    b.write("workload.qcow2", "qcow2", {Z(0, 65536), Z(5ull << 20, 4096)});
    b.run({"qemu-img", "bitmap", "--disable", "workload.qcow2", "b1"});
    b.write("workload.qcow2", "qcow2", {Z(7ull << 20, 512)});
  }
  ASSERT_TRUE(b.ok()) << b.error();

  Recording rec;
  const uint32_t seed = (bitmaps ? 2000u : 1000u) + static_cast<uint32_t>(batch);
  Status s = record_workload(img, lazy, seed, rec);
  ASSERT_TRUE(s.ok()) << s.message();
  align_discards(rec, 512);
  uint64_t flushes = 0, changes = 0;
  for (const auto& op : rec.log->ops()) (op.kind == RecordedOp::Kind::kFlush ? flushes : changes)++;
  // The end state itself must be clean.
  auto final_check = run_command({"qemu-img", "check", img});
  ASSERT_EQ(final_check.exit_code, 0) << final_check.describe();

  const int n = images_per_batch(bitmaps);
  std::mt19937 rng(7u * static_cast<uint32_t>(batch) + (lazy ? 1 : 0) + (bitmaps ? 2 : 0));
  const std::string crash = dir.file("crash.qcow2");
  int checked = 0, clean = 0, leaks = 0, copied_window = 0, torn = 0, partial_ops = 0, failures = 0;
  BitmapTally tally;
  std::vector<uint8_t> expect, mask, got;
  for (int i = 0; i < n && failures < 3; ++i) {
    // With bitmaps, a quarter of the crashes inside the open (IN_USE being
    // set) and a quarter inside the close (the bitmaps being stored), each
    // spread evenly from the window's start to its end (both are short).
    uint64_t lo = 1, hi = rec.log->now();
    if (bitmaps && i % 4 < 2) {
      const uint64_t from = i % 4 == 0 ? 1 : rec.closing, to = i % 4 == 0 ? rec.opened : rec.log->now();
      const uint64_t samples = (n + 3 - i % 4) / 4;
      lo = hi = from + (to - from) * static_cast<uint64_t>(i / 4) / std::max<uint64_t>(1, samples - 1);
    }
    const uint64_t t = std::uniform_int_distribution<uint64_t>(lo, hi)(rng);
    ++checked;
    auto bytes = crash_image(rec, t, rng, torn, partial_ops);
    ASSERT_TRUE(write_file(crash, bytes));
    const std::string where = "crash at log time " + std::to_string(t) + " of " + std::to_string(rec.log->now()) +
                              " (image " + std::to_string(i) + ")";
    bool bitmaps_ok = true;
    if (bitmaps) bitmaps_ok = check_crash_bitmaps(crash, bytes, rec, t, where, tally);
    if (lazy) {
      // Dirty: repaired by a read-write open, after which it must be clean.
      OpenOptions rw;
      rw.read_only = false;
      auto d = SyncDisk::open(crash, rw);
      ASSERT_TRUE(d.ok()) << where << ": " << d.error().message();
      ASSERT_TRUE((*d)->close().ok()) << where;
    }
    auto check = run_command({"qemu-img", "check", crash});
    // Bitmaps ignored (autoclear bit clear) leak their clusters, lazy
    // refcounts or not: the open drops the extension, as QEMU's does.
    const bool bitmaps_ignored = bitmaps && !(load_be64(&bytes[88]) & 1);
    bool ok = lazy && !bitmaps_ignored ? check.exit_code == 0 : (check.exit_code == 0 || check.exit_code == 3);
    if (bitmaps) {
      // The repairs (two copies and five more processes) on every fourth image.
      bitmaps_ok = (i % 4 == 2 ? checks_agree_and_repair(crash, check, where) : counts_agree(crash, check, where)) &&
                   bitmaps_ok;
    }
    if (!lazy && check.exit_code == 2 && only_harmless_copied_errors(check, 9)) {
      ++copied_window;
      EXPECT_TRUE(Succeeded(run_uqcow({"check", "-q", "-r", "all", crash}))) << where;
      auto repaired = run_command({"qemu-img", "check", crash});
      EXPECT_EQ(repaired.exit_code, 0) << where << ": not clean after uqcow check -r all\n" << repaired.describe();
      ok = repaired.exit_code == 0;
    }
    EXPECT_TRUE(ok) << where << "\n" << check.describe();
    if (!bitmaps_ok) ok = false;
    if (!ok) {
      ++failures;
      // Keep the image for a post-mortem (bazel collects this directory).
      if (const char* out = std::getenv("TEST_UNDECLARED_OUTPUTS_DIR")) {
        write_file(std::string(out) + "/" + layout_name(layout) + "-batch" + std::to_string(batch) +
                       "-t" + std::to_string(t) + ".qcow2",
                   bytes);
      }
    }
    if (check.exit_code == 0) ++clean;
    if (check.exit_code == 3) ++leaks;

    guest_expectation(rec, t, expect, mask);
    auto d = SyncDisk::open(crash);
    ASSERT_TRUE(d.ok()) << where << ": " << d.error().message();
    auto all = (*d)->read_all();
    ASSERT_TRUE(all.ok()) << where << ": " << all.error().message();
    for (uint64_t at = 0; at < kDiskSize; ++at) {
      if (mask[at] && (*all)[at] != expect[at]) {
        ADD_FAILURE() << where << ": guest byte " << at << " reads " << int((*all)[at]) << ", acknowledged "
                      << int(expect[at]);
        ++failures;
        break;
      }
    }
  }
  std::printf("crash replay (%s, batch %d): %zu file ops (%llu changes, %llu flushes), %zu guest requests; "
              "%d crash images checked: %d clean, %d leaks only, %d in a snapshot's OFLAG_COPIED window (repaired), "
              "%d failed; %d unflushed changes replayed, %d torn\n",
              layout_name(layout), batch, rec.log->ops().size(),
              static_cast<unsigned long long>(changes), static_cast<unsigned long long>(flushes), rec.guest.size(),
              checked, clean, leaks, copied_window, failures, partial_ops, torn);
  if (bitmaps) {
    std::printf("  bitmaps (open ended at log time %llu, close began at %llu): %d in use, %d consistent as before "
                "the open, %d consistent as stored by close (%d compared with qemu-nbd), %d images with the "
                "extension ignored\n",
                static_cast<unsigned long long>(rec.opened), static_cast<unsigned long long>(rec.closing),
                tally.in_use, tally.before_open, tally.stored, tally.nbd_compared, tally.ignored);
  }
}

std::vector<std::tuple<Layout, int>> replay_cases() {
  std::vector<std::tuple<Layout, int>> cases;
  for (Layout l : {Layout::kPlain, Layout::kLazy, Layout::kBitmaps, Layout::kLazyBitmaps}) {
    for (int batch = 0; batch < (bitmap_layout(l) ? kBitmapBatches : kBatches); ++batch) cases.emplace_back(l, batch);
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Layouts, CrashReplay, ::testing::ValuesIn(replay_cases()),
                         [](const ::testing::TestParamInfo<CrashReplay::ParamType>& info) {
                           return std::string(layout_name(std::get<0>(info.param))) + "_batch" +
                                  std::to_string(std::get<1>(info.param));
                         });

}  // namespace
}  // namespace uqcow::testing
