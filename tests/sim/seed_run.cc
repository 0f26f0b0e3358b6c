// Running one seed: opening the image, and the batches of overlapping ops.
#include "tests/sim/seed_run.h"

#include <algorithm>

namespace uqcow::sim {
namespace {

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

// Independent streams of one (layout, seed): the same pair always gives the
// same streams, whatever else runs in the process.
uint64_t stream(const Layout& layout, uint64_t seed, uint64_t which) {
  uint64_t x = fnv1a(layout.name) ^ (seed * 0x9e3779b97f4a7c15ull) ^ (which << 56);
  x ^= x >> 31;
  x *= 0xbf58476d1ce4e5b9ull;
  return x ^ (x >> 29);
}

// How long requests may be held back, drawn per seed: none, a few, many.
SimDelays delays_for(uint64_t seed_stream) {
  static constexpr double kProbability[] = {0.0, 0.05, 0.2, 0.5};
  static constexpr uint64_t kSteps[] = {8, 64, 256};
  return {kProbability[seed_stream % 4], kSteps[(seed_stream >> 8) % 3]};
}

constexpr uint64_t kMaxOpsPerBatch = 48;
constexpr uint64_t kDepths[] = {1, 2, 4, 8, 16, 24, 32};

}  // namespace

std::string replay_command(const Layout& layout, uint64_t seed) {
  return "bazel test //tests/sim:sim_test --test_env=UQCOW_SIM_LAYOUT=" + layout.name +
         " --test_env=UQCOW_SIM_SEED=" + std::to_string(seed) + " --test_output=all";
}

SeedReport run_seed(const Layout& layout, const LayoutImages& images, uint64_t seed, const SeedOptions& options) {
  return SeedRun(layout, images, seed, options).run();
}

// Bitmap seeds: their own stream, so that other seeds keep their workload.
std::optional<uint64_t> bitmap_granularity_for(const Layout& layout, uint64_t seed_stream) {
  if (layout.v2 || seed_stream % 2 != 0) return std::nullopt;
  return uint64_t{512} << ((seed_stream >> 8) % 13);  // 512 B .. 2 MiB
}

SeedRun::SeedRun(const Layout& layout, const LayoutImages& images, uint64_t seed, const SeedOptions& options)
    : layout_(layout),
      images_(images),
      seed_(seed),
      options_(options),
      rng_(stream(layout, seed, 1)),
      crash_rng_(stream(layout, seed, 2)),
      scheduler_(stream(layout, seed, 3), delays_for(stream(layout, seed, 4))),
      workload_(layout, rng_),
      bitmap_granularity_(bitmap_granularity_for(layout, stream(layout, seed, 5))) {
  size_ = layout.size;
  // Room to grow: resize never passes this (a multiple of 512, as
  // encryption needs).
  max_size_ = size_ + 4ull * layout.cluster_size;
  // Nor shrinks below half the starting size: enough to drop L2 tables and
  // refcount blocks, and to keep the hot spots' neighbourhoods busy.
  min_size_ = size_ / 2 / 512 * 512;
  auto model = std::make_shared<std::vector<uint8_t>>(images.content);
  model->resize(max_size_, 0);
  model_ = std::move(model);
  if (layout.backing) backing_content_ = std::make_shared<const std::vector<uint8_t>>(images.content);
  // Durability is tracked (every write kept until flushed) only where a
  // crash image will be taken.
  storage_ = std::make_shared<SimStorage>(images.image, options.crash);
  if (layout.backing) backing_storage_ = std::make_shared<SimStorage>(images.backing, false);
}

Task<Result<std::unique_ptr<Disk>>> SeedRun::open_backing(std::string path, std::string format) {
  if (path != kBackingName || format != "qcow2") {
    co_return Error(ENOENT, "the simulation has no backing file '" + path + "' (format '" + format + "')");
  }
  OpenOptions o;
  o.read_only = true;
  o.cache_clean_interval = 0;
  auto device = std::make_unique<SimDevice>(scheduler_, backing_storage_, kBackingName, true);
  auto none = [](const std::string& p, const std::string&) -> Task<Result<std::unique_ptr<Disk>>> {
    co_return Error(ENOENT, "unexpected backing file " + p);
  };
  UQ_CO_ASSIGN_OR_RETURN(auto img, co_await qcow2::Qcow2Image::open(std::move(device), o, none));
  co_return std::unique_ptr<Disk>(std::move(img));
}

Task<Result<std::unique_ptr<qcow2::Qcow2Image>>> SeedRun::open_image(std::shared_ptr<SimStorage> storage,
                                                                   OpenOptions o) {
  auto device = std::make_unique<SimDevice>(scheduler_, std::move(storage), kImageName, o.read_only);
  auto opener = [this](const std::string& path, const std::string& format) { return open_backing(path, format); };
  co_return co_await qcow2::Qcow2Image::open(std::move(device), std::move(o), opener);
}

bool SeedRun::hang(const std::string& what) {
  return fail("hang", what + " can never finish: nothing is ready to run and no device request is in flight");
}

SeedReport SeedRun::run() {
  auto opened = wait(open_image(storage_, layout_.open_options(false)));
  if (!opened) {
    hang("opening the image");
  } else if (!opened->ok()) {
    fail("open", opened->error().message());
  } else {
    image_ = std::move(*opened).value();
    if (bitmap_granularity_) add_bitmap();
    const uint64_t crash_batch = options_.crash ? below(options_.batches) : options_.batches;
    for (uint64_t b = 0; b < options_.batches && !report_.failed; ++b) run_batch(b, b == crash_batch);
    if (!report_.failed) finish();
  }
  if (image_ && !hung_) {
    (void)wait(image_->close());
  }
  if (hung_) (void)image_.release();  // coroutines of it are stuck: leaked
  report_.completions = scheduler_.completions();
  report_.decisions = scheduler_.decisions();
  report_.order_hash = scheduler_.order_hash();
  return report_;
}

bool SeedRun::run_batch(uint64_t index, bool crash_here) {
  batch_index_ = index;
  ops_.clear();
  state_ = WorkloadState{};
  state_.size = size_;
  batch_start_size_ = size_;
  state_.max_size = max_size_;
  state_.min_size = min_size_;
  state_.bitmaps = bitmap_granularity_.has_value();
  if (must_dirty_) {
    // A backup tool clears its bitmap after each backup: every batch starts
    // clean, so that clean granules stay plentiful for the checks.
    Status cleared = image_->bitmap_clear(kBitmapName);
    if (!cleared.ok()) return fail("bitmap clear", cleared.message());
    must_dirty_->clear();
    may_dirty_->clear();
  }
  shrink_to_ = kNever;
  for (const auto& [name, snap] : snapshots_) state_.snapshots[name] = snap.size;
  const uint64_t n = 6 + below(kMaxOpsPerBatch - 5);
  depth_ = std::min(kDepths[below(std::size(kDepths))], std::max<uint64_t>(1, options_.max_depth));
  // How eagerly new ops are issued rather than device requests completed:
  // low keeps few ops in flight, high piles them up to the depth.
  const double p_issue = 0.15 + 0.7 * std::uniform_real_distribution<double>(0, 1)(rng_);
  const uint64_t crash_step = crash_here ? below(n * 8) : kNever;
  batch_start_ = ++clock_;
  crash_ = {};
  ops_.reserve(n);

  auto group = std::make_unique<TaskGroup>();
  for (uint64_t steps = 0; ops_.size() < n || in_flight_ > 0; ++steps) {
    if (steps == crash_step) take_crash();
    const bool can_issue = ops_.size() < n && in_flight_ < depth_;
    if (can_issue && (scheduler_.pending() == 0 || std::bernoulli_distribution(p_issue)(rng_))) {
      issue(*group);
    } else if (!scheduler_.step() && this_thread_ready_queue().drain() == 0) {
      // Ops in flight wait for something no request will ever bring.
      (void)group.release();
      hung_ = true;
      return fail("deadlock", std::to_string(in_flight_) + " ops in flight, but nothing is ready to run and "
                                                           "no device request is in flight");
    }
  }
  if (crash_here && !crash_.taken) take_crash();
  report_.ops += n;
  ++report_.batches;
  return check_batch();
}

void SeedRun::issue(TaskGroup& group) {
  ops_.push_back(std::make_unique<Op>(workload_.next(next_op_++, state_)));
  Op& op = *ops_.back();
  op.issue = ++clock_;
  op.resize_in_flight = resizes_in_flight_ > 0;
  op.resizes_before = resizes_issued_;
  if (op.kind == OpKind::kResize) {
    ++resizes_in_flight_;
    ++resizes_issued_;
    if (op.new_size < size_) shrink_to_ = op.new_size;
  }
  ++in_flight_;
  group.spawn(run_op(op));  // runs until its first suspension
  this_thread_ready_queue().drain();
}

Task<void> SeedRun::run_op(Op& op) {
  op.status = co_await execute(op);
  op.complete = ++clock_;
  --in_flight_;
  if (op.kind == OpKind::kResize) --resizes_in_flight_;
  // Ops issued from now on use the new size. Until then they use the old
  // one: after a shrink, those that no longer fit are refused (execute).
  if (op.kind == OpKind::kResize && op.status.ok()) state_.size = op.new_size;
  if (must_dirty_) track_bitmap(op);
}

Task<Status> SeedRun::execute(Op& op) {
  Status s = co_await perform(op);
  // A request that overlapped a shrink in time, generated against the old
  // size, and reaching past the new end: a drained section orders it
  // wholly before or wholly after the shrink, and after it the request is
  // refused whole (EINVAL, checked before anything is read or written).
  const bool resize_overlapped = op.resize_in_flight || resizes_issued_ != op.resizes_before;
  if (!s.ok() && s.code() == EINVAL && resize_overlapped && op.offset + op.length > shrink_to_ &&
      s.message().find("beyond the end of the disk") != std::string::npos) {
    op.no_op = true;
    op.refused_past_end = true;
    co_return Status();
  }
  co_return s;
}

Task<Status> SeedRun::perform(Op& op) {
  qcow2::Qcow2Image& img = *image_;
  switch (op.kind) {
    case OpKind::kRead:
      co_return co_await img.read(op.offset, op.buf);
    case OpKind::kWrite:
      co_return co_await img.write(op.offset, op.buf);
    case OpKind::kWriteZeroes:
      co_return co_await img.write_zeroes(op.offset, op.length, op.may_unmap);
    case OpKind::kDiscard:
      co_return co_await img.discard(op.offset, op.length);
    case OpKind::kCompressed: {
      Status s = co_await img.write_compressed(op.offset, op.buf);
      // Compression only fills unallocated clusters (EIO otherwise, as in
      // QEMU). A refused write must have changed nothing: the oracle then
      // gives it no effect, so any trace of its data fails the check.
      if (!s.ok() && s.code() == EIO && s.message().find("compressed write to an allocated cluster") != std::string::npos) {
        op.no_op = true;
        co_return Status();
      }
      // The disk's partial last cluster, generated against the old size,
      // and a resize overlapping it in time: the write may be admitted after
      // the resize (a drained section) and is then checked against the new
      // size.
      const bool resize_overlapped = op.resize_in_flight || resizes_issued_ != op.resizes_before;
      if (!s.ok() && s.code() == EINVAL && resize_overlapped &&
          s.message().find("must cover whole clusters") != std::string::npos) {
        op.no_op = true;
        co_return Status();
      }
      co_return s;
    }
    case OpKind::kFlush:
      co_return co_await img.flush();
    case OpKind::kSnapshotCreate:
      co_return co_await img.snapshot_create(op.snapshot);
    case OpKind::kSnapshotApply:
      co_return co_await img.snapshot_apply(op.snapshot);
    case OpKind::kSnapshotDelete:
      co_return co_await img.snapshot_delete(op.snapshot);
    case OpKind::kResize:
      co_return co_await img.resize(op.new_size);
  }
  co_return Error(EINVAL, "unknown op");
}

bool SeedRun::add_bitmap() {
  Status added = image_->bitmap_add(kBitmapName, *bitmap_granularity_, true);
  if (!added.ok()) return fail("bitmap add", added.message());
  auto closed = wait(image_->close());
  if (!closed) return hang("closing after adding the bitmap");
  if (!closed->ok()) return fail("closing after adding the bitmap", closed->message());
  image_.reset();
  auto opened = wait(open_image(storage_, layout_.open_options(false)));
  if (!opened) return hang("reopening after adding the bitmap");
  if (!opened->ok()) return fail("reopening after adding the bitmap", opened->error().message());
  image_ = std::move(*opened).value();
  auto bm = image_->dirty_bitmap(kBitmapName);
  if (!bm.ok()) return fail("the stored bitmap does not load", bm.error().message());
  if ((*bm)->dirty_granules() != 0) return fail("a new bitmap is not clean after a reopen", "");
  must_dirty_.emplace(**bm);
  may_dirty_.emplace(**bm);
  report_.bitmap = true;
  return true;
}

void SeedRun::track_bitmap(const Op& op) {
  // The models follow the disk's size as the image's bitmap does (resize
  // resizes it at its end; ops admitted after it mark against the new size).
  const uint64_t size = image_->size();
  if (must_dirty_->size() != size) {
    const uint64_t old = must_dirty_->size();
    must_dirty_->resize(size);
    may_dirty_->resize(size);
    // A resize zeroes around the old or new end: what it touches may be
    // marked (down to the granule holding the smaller end).
    const uint64_t from = std::min(old, size) / *bitmap_granularity_ * *bitmap_granularity_;
    may_dirty_->set(from, std::max(old, size) - from);
  }
  switch (op.kind) {
    case OpKind::kWrite:
    case OpKind::kWriteZeroes:
    case OpKind::kDiscard:
    case OpKind::kCompressed:
      may_dirty_->set(op.offset, op.length);
      // A compressed write refused over an allocated cluster (or as not
      // whole clusters) was marked, as QEMU marks a failed write; a request
      // refused past a shrunk end never started.
      if (op.status.ok() && !op.refused_past_end) must_dirty_->set(op.offset, op.length);
      break;
    default:
      break;
  }
}

void SeedRun::take_crash() {
  crash_.taken = true;
  crash_.tick = ++clock_;
  auto in_flight = scheduler_.in_flight_changes(*storage_);
  crash_.image = storage_->crash_image(crash_rng_, in_flight, report_.crash_stats);
  report_.crashed = true;
}

}  // namespace uqcow::sim
