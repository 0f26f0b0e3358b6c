// Checking one seed: every reply of a batch against the oracle, the whole
// disk read back, snapshots, the metadata (check_image), crash images, and
// at the end qemu-img's check and convert.
#include <algorithm>
#include <cstring>
#include <set>

#include "block/endian.h"
#include "tests/sim/seed_run.h"
#include "tests/testutil.h"

namespace uqcow::sim {

using testing::CommandResult;
using testing::read_file;
using testing::run_command;
using testing::TempDir;
using testing::write_file;
namespace {

constexpr uint64_t kReadChunk = 1 << 20;
constexpr size_t kHeaderSizeField = 24;  // the qcow2 header's virtual size, bytes 24-31

std::span<const uint8_t> as_u8(const std::vector<std::byte>& v) {
  return {reinterpret_cast<const uint8_t*>(v.data()), v.size()};
}

Task<Status> read_whole(qcow2::Qcow2Image& img, std::vector<uint8_t>& out) {
  out.assign(img.size(), 0);
  for (uint64_t at = 0; at < out.size(); at += kReadChunk) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(kReadChunk, out.size() - at));
    UQ_CO_TRY(co_await img.read(at, std::as_writable_bytes(std::span(out.data() + at, n))));
  }
  co_return Status();
}

// The first difference of two byte strings, or "".
std::string first_difference(std::span<const uint8_t> got, std::span<const uint8_t> want) {
  if (got.size() != want.size()) {
    return "sizes differ: " + std::to_string(got.size()) + " and " + std::to_string(want.size());
  }
  if (got.empty() || std::memcmp(got.data(), want.data(), got.size()) == 0) return "";
  auto [a, b] = std::mismatch(got.begin(), got.end(), want.begin());
  const size_t at = static_cast<size_t>(a - got.begin());
  size_t n = 0;
  for (size_t i = at; i < got.size(); ++i) n += got[i] != want[i];
  return "guest byte " + std::to_string(at) + " is " + std::to_string(*a) + ", expected " + std::to_string(*b) + " (" +
         std::to_string(n) + " bytes differ)";
}

std::string summarize(const qcow2::CheckResult& r) {
  std::string s = std::to_string(r.corruptions) + " corruptions, " + std::to_string(r.leaks) + " leaks, " +
                  std::to_string(r.check_errors) + " check errors" +
                  (r.stopped.ok() ? "" : ", stopped: " + r.stopped.message());
  size_t shown = 0;
  for (const auto& m : r.messages) {
    if (shown++ == 16) {
      s += "\n  ...";
      break;
    }
    s += "\n  " + m;
  }
  return s;
}

// Whether every ERROR of a check is an OFLAG_COPIED mismatch: the window a
// crash inside a snapshot operation may leave, inherent to the format and
// QEMU's too (tests/crash_replay_test.cc explains it).
bool only_copied_errors(const qcow2::CheckResult& r) {
  bool any = false;
  for (const auto& m : r.messages) {
    if (m.find("ERROR") == std::string::npos) continue;
    if (m.find("OFLAG_COPIED") == std::string::npos) return false;
    any = true;
  }
  return any && r.check_errors == 0;
}

}  // namespace

bool SeedRun::fail(const std::string& what, const std::string& detail) {
  if (report_.failed) return false;
  report_.failed = true;
  std::string s = "layout " + layout_.name + ", seed " + std::to_string(seed_) + ", batch " +
                  std::to_string(batch_index_ + 1) + " of " + std::to_string(options_.batches) + " (" +
                  std::to_string(ops_.size()) + " ops, depth " + std::to_string(depth_) + ")" +
                  (options_.crash ? ", a crash seed" : "") + ": " + what + "\n" + detail + "\nreplay: " +
                  replay_command(layout_, seed_) + "\nops of the batch, with the driver's ticks (the batch began at t" +
                  std::to_string(batch_start_) +
                  (crash_.taken ? ", the crash image was taken at t" + std::to_string(crash_.tick) : std::string()) +
                  "):\n";
  for (const auto& op : ops_) s += "  " + op->describe() + "\n";
  report_.failure = std::move(s);
  return false;
}

void SeedRun::add_effects(History& history, const Op& op, uint64_t cut) const {
  if (op.issue >= cut || op.no_op) return;
  Effect e;
  e.begin = op.offset;
  e.end = op.offset + op.length;
  e.issue = op.issue;
  e.complete = op.complete < cut ? op.complete : kNever;
  e.op = op.id;
  e.runs = op.runs;
  switch (op.kind) {
    case OpKind::kWrite:
    case OpKind::kCompressed:
      e.kind = Effect::Kind::kData;
      break;
    case OpKind::kWriteZeroes:
      e.kind = Effect::Kind::kZero;
      break;
    case OpKind::kDiscard:
      e.kind = Effect::Kind::kTrim;
      break;
    case OpKind::kSnapshotApply: {
      const Snapshot& snap = snapshots_.at(op.snapshot);
      e.kind = Effect::Kind::kContent;
      e.begin = 0;
      e.end = snap.size;
      e.content = snap.content;
      break;
    }
    case OpKind::kResize:
      // What a shrink drops is seen only by a crash image that kept the old
      // size (afterwards the disk ends before it): the bytes may still hold
      // their data, or zeros (the tail of the cluster holding the new end
      // zeroed, the clusters after it unallocated), or over a backing file
      // its bytes under the unallocated clusters.
      if (cut == kNever || op.new_size >= batch_start_size_) return;
      e.kind = Effect::Kind::kTrim;
      e.begin = op.new_size;
      e.end = batch_start_size_;
      history.add(e);
      e.begin = (op.new_size + layout_.cluster_size - 1) / layout_.cluster_size * layout_.cluster_size;
      if (backing_content_ && e.begin < e.end) {
        e.kind = Effect::Kind::kBacking;
        e.content = backing_content_;
        history.add(e);
      }
      return;
    default:
      return;
  }
  history.add(e);
  // An unaligned write (or zero write) to an encrypted image is a
  // read-modify-write of whole 512-byte sectors: the bytes around it may be
  // written back as they were read.
  if (layout_.encrypted && (op.kind == OpKind::kWrite || op.kind == OpKind::kWriteZeroes)) {
    Effect pad = e;
    pad.kind = Effect::Kind::kRestore;
    if (op.offset % kSimSector) {
      pad.begin = op.offset / kSimSector * kSimSector;
      pad.end = op.offset;
      history.add(pad);
    }
    if (e.end % kSimSector) {
      pad.begin = e.end;
      pad.end = (e.end / kSimSector + 1) * kSimSector;
      history.add(pad);
    }
  }
}

std::optional<std::vector<uint8_t>> SeedRun::read_disk(qcow2::Qcow2Image& image, const std::string& what) {
  std::vector<uint8_t> bytes;
  auto s = wait(read_whole(image, bytes));
  if (!s) {
    hang("reading " + what);
    return std::nullopt;
  }
  if (!s->ok()) {
    fail("read error", "reading " + what + ": " + s->message());
    return std::nullopt;
  }
  return bytes;
}

bool SeedRun::check_batch() {
  for (const auto& op : ops_) {
    if (!op->status.ok()) return fail("an op failed", op->describe());
  }
  History history(model_);
  for (const auto& op : ops_) add_effects(history, *op, kNever);
  for (const auto& op : ops_) {
    if (op->kind != OpKind::kRead || op->no_op) continue;
    std::string bad = history.check(op->offset, as_u8(op->buf), op->issue, op->complete);
    if (!bad.empty()) return fail("a read returned bytes the oracle does not allow", op->describe() + ": " + bad);
  }
  auto flushed = wait(image_->flush());
  if (!flushed) return hang("the flush after the batch");
  if (!flushed->ok()) return fail("flush failed", flushed->message());
  for (const auto& op : ops_) {
    if (op->kind == OpKind::kResize) size_ = op->new_size;
  }
  std::vector<uint8_t> disk;
  if (!check_read_back(history, disk)) return false;
  if (!check_snapshots(history)) return false;
  if (!check_metadata(storage_, false, "after the batch (image open, flushed)")) return false;
  if (options_.slow && !check_with_qemu(storage_->bytes(), false)) return false;
  if (must_dirty_ && !check_bitmap()) return false;
  if (crash_.taken && !check_crash()) return false;
  disk.resize(max_size_, 0);
  model_ = std::make_shared<const std::vector<uint8_t>>(std::move(disk));
  return true;
}

bool SeedRun::check_read_back(const History& history, std::vector<uint8_t>& disk) {
  if (image_->size() != size_) {
    return fail("wrong disk size", "the image is " + std::to_string(image_->size()) + " bytes, expected " +
                                       std::to_string(size_));
  }
  const uint64_t issue = ++clock_;
  auto bytes = read_disk(*image_, "the disk after the batch");
  if (!bytes) return false;
  const uint64_t complete = ++clock_;
  std::string bad = history.check(0, *bytes, issue, complete);
  if (!bad.empty()) return fail("the disk read back after the batch holds bytes the oracle does not allow", bad);
  disk = std::move(*bytes);
  return true;
}

std::string SeedRun::past_snapshot_end(std::span<const uint8_t> bytes, uint64_t size) const {
  // The disk opened at a snapshot keeps the image's current size (as
  // qemu-img convert -l); past the snapshot's own size it reads as zeros,
  // or, over a backing file, as the backing file where the snapshot maps
  // nothing (a snapshot taken after a shrink is smaller than the backing
  // file).
  for (uint64_t at = size; at < bytes.size(); ++at) {
    const uint8_t v = bytes[at];
    if (v == 0 || (backing_content_ && at < backing_content_->size() && v == (*backing_content_)[at])) continue;
    return "guest byte " + std::to_string(at) + " past the snapshot's size (" + std::to_string(size) + ") is " +
           std::to_string(v) + ", neither zero nor the backing file's";
  }
  return "";
}

std::optional<std::vector<uint8_t>> SeedRun::read_snapshot(const std::string& name, uint64_t& size) {
  // The file opened a second time, read-only at the snapshot, as `qemu-img
  // convert -l` would; the image itself stays open (idle and flushed).
  OpenOptions o = layout_.open_options(true);
  o.snapshot = name;
  std::shared_ptr<SimStorage> file = storage_;
  for (const auto& s : image_->snapshots()) {
    if (s.name != name || s.disk_size <= image_->size()) continue;
    // A snapshot taken before a shrink is larger than the disk, which
    // keeps its current size when opened at the snapshot: it is read
    // whole from a copy of the file whose header has the snapshot's size
    // (the active L1 table keeps its size when the disk shrinks, so it
    // still covers that size).
    std::vector<uint8_t> copy = storage_->bytes();
    store_be64(copy.data() + kHeaderSizeField, s.disk_size);
    file = std::make_shared<SimStorage>(std::move(copy), false);
  }
  auto img = wait(open_image(file, o));
  if (!img) {
    hang("opening snapshot " + name);
    return std::nullopt;
  }
  if (!img->ok()) {
    fail("snapshot does not open", name + ": " + img->error().message());
    return std::nullopt;
  }
  qcow2::Qcow2Image& snap = ***img;
  size = 0;
  for (const auto& s : snap.snapshots()) {
    if (s.name == name) size = s.disk_size;
  }
  auto bytes = read_disk(snap, "snapshot " + name);
  auto closed = wait(snap.close());
  if (!closed) hang("closing snapshot " + name);
  if (!bytes || !closed) return std::nullopt;
  const std::string past = size > bytes->size() ? "the disk is smaller" : past_snapshot_end(*bytes, size);
  if (!past.empty()) {
    fail("snapshot reads past its size",
         name + ": disk size " + std::to_string(size) + ", read " + std::to_string(bytes->size()) + " bytes: " + past);
    return std::nullopt;
  }
  bytes->resize(size);
  return bytes;
}

bool SeedRun::check_snapshots(const History& history) {
  for (const auto& op : ops_) {
    if (op->kind == OpKind::kSnapshotDelete) snapshots_.erase(op->snapshot);
  }
  std::set<std::string> fresh;
  for (const auto& op : ops_) {
    if (op->kind != OpKind::kSnapshotCreate) continue;
    fresh.insert(op->snapshot);
    uint64_t size = 0;
    auto bytes = read_snapshot(op->snapshot, size);
    if (!bytes) return false;
    // Taken at some point while the op ran: like a read over its interval.
    // Its size is the disk's before or after a resize of the batch.
    if (size != batch_start_size_ && size != size_) {
      return fail("wrong snapshot size", op->describe() + ": " + std::to_string(size) + " bytes, the disk had " +
                                             std::to_string(batch_start_size_) + " or " + std::to_string(size_));
    }
    std::string bad = history.check(0, *bytes, op->issue, op->complete);
    if (!bad.empty()) return fail("snapshot content the oracle does not allow", op->describe() + ": " + bad);
    snapshots_[op->snapshot] = {std::make_shared<const std::vector<uint8_t>>(std::move(*bytes)), size};
  }
  // Every older snapshot must still hold exactly what it held when it was
  // taken.
  for (const auto& [name, snap] : snapshots_) {
    if (fresh.count(name)) continue;
    uint64_t size = 0;
    auto bytes = read_snapshot(name, size);
    if (!bytes) return false;
    std::string diff = first_difference(*bytes, *snap.content);
    if (!diff.empty()) return fail("a snapshot changed", "snapshot " + name + ": " + diff);
  }
  return true;
}

bool SeedRun::check_metadata(std::shared_ptr<SimStorage> file, bool strict, const std::string& when,
                             bool copied_window_possible) {
  // Read-only: the file may be the open image's (idle and flushed).
  SimDevice device(scheduler_, file, kImageName, true);
  auto res = wait(qcow2::check_image(device, nullptr, qcow2::RepairMode::kNone));
  if (!res) return hang("check_image " + when);
  if (!res->ok()) return fail("check_image cannot check the image " + when, res->error().message());
  const qcow2::CheckResult& r = **res;
  const bool clean = r.stopped.ok() && r.corruptions == 0 && r.check_errors == 0 && (!strict || r.leaks == 0);
  if (clean) return true;
  if (copied_window_possible && r.stopped.ok() && only_copied_errors(r)) {
    // Such an image must be repairable into a clean one.
    auto rw = std::make_shared<SimStorage>(file->bytes(), false);
    SimDevice repair_device(scheduler_, rw, kImageName, false);
    auto repaired = wait(qcow2::check_image(repair_device, nullptr, qcow2::RepairMode::kAll));
    if (!repaired) return hang("check_image -r all " + when);
    if (repaired->ok() && (*repaired)->stopped.ok() && (*repaired)->corruptions == 0 && (*repaired)->leaks == 0) {
      report_.crash_copied_window = true;
      return true;
    }
    return fail("check_image " + when + ": OFLAG_COPIED errors that a repair does not fix",
                summarize(r) + (repaired->ok() ? "\nafter -r all: " + summarize(**repaired) : ""));
  }
  return fail("check_image " + when + (strict ? " (strict: no leaks either)" : " (leaks allowed)"), summarize(r));
}

bool SeedRun::check_bitmap() {
  auto bm = image_->dirty_bitmap(kBitmapName);
  if (!bm.ok()) return fail("the bitmap is gone", bm.error().message());
  const DirtyBitmap& got = **bm;
  if (got.size() != must_dirty_->size()) {
    return fail("bitmap size", std::to_string(got.size()) + " bytes, the disk has " + std::to_string(must_dirty_->size()));
  }
  const uint64_t g = got.granularity();
  for (uint64_t off = 0; off < got.size(); off += g) {
    const bool dirty = got.dirty_at(off), must = must_dirty_->dirty_at(off), may = may_dirty_->dirty_at(off);
    if (must && !dirty) {
      return fail("the bitmap missed a write", "granule at " + std::to_string(off) + " (" + std::to_string(g) +
                                                   " bytes) is clean, but an op that changed it completed");
    }
    if (dirty && !may) {
      return fail("the bitmap marks what nothing touched",
                  "granule at " + std::to_string(off) + " (" + std::to_string(g) + " bytes) is dirty");
    }
  }
  return true;
}

bool SeedRun::check_crash_bitmap(qcow2::Qcow2Image& image, const History& history,
                                 const std::vector<uint8_t>& bytes) {
  auto bm = image.dirty_bitmap(kBitmapName);
  // Left in use: inconsistent, always allowed after a crash. Gone: the crash
  // hit setting IN_USE in place while the autoclear bit was clear, so the
  // bitmaps are ignored (and their clusters leak), as QEMU's would be.
  if (!bm.ok() && (bm.error().code() == EINVAL || bm.error().code() == ENOENT)) return true;
  if (!bm.ok()) return fail("after the crash the bitmap does not load", bm.error().message());
  // Consistent: it was stored (IN_USE cleared) by the last flush completed
  // before the crash (or the one ending the previous batch), and nothing
  // may have changed the disk since without setting IN_USE again. So every
  // granule it calls clean holds what the disk held during that flush.
  uint64_t from = batch_start_, to = batch_start_;
  for (const auto& op : ops_) {
    if (op->kind == OpKind::kFlush && op->complete < crash_.tick && op->issue > from) {
      from = op->issue;
      to = op->complete;
    }
  }
  const DirtyBitmap& got = **bm;
  const uint64_t g = got.granularity();
  const uint64_t end = std::min<uint64_t>(got.size(), bytes.size());
  for (uint64_t off = 0; off < end; off += g) {
    if (got.dirty_at(off)) {
      if (off < may_dirty_->size() && !may_dirty_->dirty_at(off)) {
        return fail("after the crash the bitmap marks what nothing touched", "granule at " + std::to_string(off));
      }
      continue;
    }
    const uint64_t n = std::min(g, end - off);
    std::string bad = history.check(off, std::span(bytes).subspan(off, n), from, to);
    if (!bad.empty()) {
      return fail("after the crash a consistent bitmap calls changed data clean",
                  "granule at " + std::to_string(off) + " (" + std::to_string(g) + " bytes), stored by the flush " +
                      "at t" + std::to_string(from) + ": " + bad);
    }
  }
  ++report_.crash_bitmaps_consistent;
  return true;
}

bool SeedRun::check_crash() {
  // Every byte must hold its value as of the last guest flush completed
  // before the crash (the batch start counts as one: the previous batch
  // ended flushed), or a value of an op issued after that flush began or
  // still in flight: the oracle over [flush issue, never] with every op
  // completed after the crash treated as in flight.
  History history(model_);
  uint64_t durable_from = batch_start_;
  bool snapshot_op_open = false;
  for (const auto& op : ops_) {
    add_effects(history, *op, crash_.tick);
    if (op->kind == OpKind::kFlush && op->complete < crash_.tick) durable_from = std::max(durable_from, op->issue);
    const bool snapshot_op = op->kind == OpKind::kSnapshotCreate || op->kind == OpKind::kSnapshotApply ||
                             op->kind == OpKind::kSnapshotDelete;
    if (snapshot_op && op->issue < crash_.tick && op->complete > crash_.tick) snapshot_op_open = true;
  }
  auto storage = std::make_shared<SimStorage>(crash_.image, false);
  // Read-write: a lazy-refcounts image is repaired here.
  auto img = wait(open_image(storage, layout_.open_options(false)));
  if (!img) return hang("opening the crash image");
  if (!img->ok()) return fail("the crash image does not open read-write", img->error().message());
  const uint64_t size = (**img)->size();
  auto bytes = read_disk(***img, "the crash image");
  if (bytes && must_dirty_ && !check_crash_bitmap(***img, history, *bytes)) {
    (void)wait((**img)->close());
    return false;
  }
  if (bytes && size < batch_start_size_ && !check_grown_back(***img, *bytes)) return false;
  auto closed = wait((**img)->close());
  if (!bytes) return false;
  if (!closed) return hang("closing the crash image");
  if (!closed->ok()) return fail("closing the crash image failed", closed->message());
  bool size_ok = size == batch_start_size_;
  for (const auto& op : ops_) {
    if (op->kind == OpKind::kResize && op->issue < crash_.tick) size_ok = size_ok || size == op->new_size;
  }
  if (!size_ok) return fail("crash image size", "the crash image is " + std::to_string(size) + " bytes");
  std::string bad = history.check(0, *bytes, durable_from, kNever);
  if (!bad.empty()) {
    return fail("after the crash the disk holds bytes the oracle does not allow",
                bad + " (durable from the flush issued at t" + std::to_string(durable_from) + ")");
  }
  return check_metadata(storage, false, "of the crash image after a read-write open and close",
                        snapshot_op_open);
}

bool SeedRun::check_grown_back(qcow2::Qcow2Image& image, const std::vector<uint8_t>& bytes) {
  // The crash image has a shrink's new size: growing it back to the old one
  // must show zeros past the new end, whatever the dropped clusters held
  // (and whatever a backing file holds there), and leave the rest alone.
  // The crash left the bitmap inconsistent, which blocks a resize (as in
  // QEMU): it goes first, as a user would remove it.
  if (must_dirty_) {
    Status removed = image.bitmap_remove(kBitmapName);
    if (!removed.ok()) return fail("removing the crash image's inconsistent bitmap", removed.message());
  }
  auto grown = wait(image.resize(batch_start_size_));
  if (!grown) return hang("growing the shrunk crash image");
  if (!grown->ok()) return fail("the shrunk crash image does not grow back", grown->message());
  auto again = read_disk(image, "the crash image grown back");
  if (!again) return false;
  std::vector<uint8_t> want = bytes;
  want.resize(batch_start_size_, 0);
  std::string diff = first_difference(*again, want);
  if (!diff.empty()) {
    return fail("the crash image shrunk to " + std::to_string(bytes.size()) + " and grown back to " +
                    std::to_string(batch_start_size_) + " is not zero past the smaller size",
                diff);
  }
  return true;
}

bool SeedRun::finish() {
  batch_index_ = options_.batches - 1;
  auto closed = wait(image_->close());
  if (!closed) return hang("close");
  if (!closed->ok()) return fail("close failed", closed->message());
  image_.reset();
  if (!check_metadata(storage_, true, "after close")) return false;
  auto img = wait(open_image(storage_, layout_.open_options(false)));
  if (!img) return hang("reopening the image");
  if (!img->ok()) return fail("the image does not reopen", img->error().message());
  image_ = std::move(*img).value();
  // What close stored is what the bitmap must (and may) hold.
  if (must_dirty_ && !check_bitmap()) return false;
  auto bytes = read_disk(*image_, "the reopened disk");
  if (!bytes) return false;
  std::string diff = first_difference(*bytes, std::span(model_->data(), size_));
  if (!diff.empty()) return fail("the reopened disk differs from the model", diff);
  closed = wait(image_->close());
  if (!closed) return hang("close after reopening");
  if (!closed->ok()) return fail("close after reopening failed", closed->message());
  image_.reset();
  return check_with_qemu(storage_->bytes(), true);
}

bool SeedRun::check_with_qemu(const std::vector<uint8_t>& file, bool final) {
  TempDir dir("sim-qemu");
  const std::string image = dir.file("disk.qcow2");
  if (!write_file(image, file) || (layout_.backing && !write_file(dir.file("base.qcow2"), images_.backing))) {
    return fail("cannot write " + image, "");
  }
  std::vector<std::string> check = {"qemu-img", "check"};
  for (auto& a : qemu_image_args(layout_, image)) check.push_back(a);
  CommandResult r = run_command(check);
  // Exit 3 is leaks only, allowed while the image is open.
  if (!(r.exit_code == 0 || (!final && r.exit_code == 3))) {
    return fail(final ? "qemu-img check after close" : "qemu-img check of the open image", r.describe());
  }
  if (!final) return true;
  auto convert = [&](const std::string& snapshot, const std::string& out) {
    std::vector<std::string> argv = {"qemu-img", "convert"};
    auto spec = qemu_image_args(layout_, image);
    argv.insert(argv.end(), spec.begin(), spec.end() - 1);
    if (!snapshot.empty()) argv.insert(argv.end(), {"-l", "snapshot.name=" + snapshot});
    argv.insert(argv.end(), {spec.back(), "-O", "raw", out});
    return run_command(argv);
  };
  r = convert("", dir.file("disk.raw"));
  if (!r.ok()) return fail("qemu-img convert", r.describe());
  auto raw = read_file(dir.file("disk.raw"));
  std::string diff = raw ? first_difference(*raw, std::span(model_->data(), size_)) : "no output";
  if (!diff.empty()) return fail("qemu-img convert -O raw differs from the model", diff);
  if (!options_.slow) return true;
  for (const auto& [name, snap] : snapshots_) {
    r = convert(name, dir.file(name + ".raw"));
    if (!r.ok()) return fail("qemu-img convert -l snapshot.name=" + name, r.describe());
    raw = read_file(dir.file(name + ".raw"));
    // As the image's own view (read_snapshot) at the disk's current size:
    // past the snapshot's size, zeros or the backing file; a snapshot
    // larger than the disk (taken before a shrink) shows its first bytes.
    const uint64_t common = raw ? std::min<uint64_t>(raw->size(), snap.content->size()) : 0;
    diff = !raw ? "no output" : past_snapshot_end(*raw, snap.content->size());
    if (diff.empty()) diff = first_difference(std::span(*raw).first(common), std::span(*snap.content).first(common));
    if (!diff.empty()) return fail("qemu-img's view of snapshot " + name + " differs", diff);
  }
  return true;
}

}  // namespace uqcow::sim
