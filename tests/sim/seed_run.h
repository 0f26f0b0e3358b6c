// SeedRun: the state of one seed of the simulation (driver.h). Running the
// batches is seed_run.cc; checking them (oracle, read-back, snapshots,
// metadata, crash images, qemu-img) is seed_checks.cc.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "block/dirty_bitmap.h"
#include "engine/ready_queue.h"
#include "engine/task.h"
#include "engine/task_group.h"
#include "qcow2/check.h"
#include "qcow2/image.h"
#include "tests/sim/driver.h"
#include "tests/sim/oracle.h"
#include "tests/sim/workload.h"

namespace uqcow::sim {

class SeedRun {
 public:
  SeedRun(const Layout& layout, const LayoutImages& images, uint64_t seed, const SeedOptions& options);
  SeedReport run();

 private:
  struct Snapshot {
    std::shared_ptr<const std::vector<uint8_t>> content;  // exact, read back
    uint64_t size = 0;
  };

  // ---- running (seed_run.cc) -------------------------------------------------
  bool run_batch(uint64_t index, bool crash_here);
  void issue(TaskGroup& group);
  Task<void> run_op(Op& op);
  Task<Status> execute(Op& op);
  Task<Status> perform(Op& op);
  void take_crash();
  Task<Result<std::unique_ptr<qcow2::Qcow2Image>>> open_image(std::shared_ptr<SimStorage> storage, OpenOptions o);
  Task<Result<std::unique_ptr<Disk>>> open_backing(std::string path, std::string format);
  // Drives `task` on the scheduler. nullopt when it can never finish (a
  // hang: nothing ready, no request parked); its frames are then leaked on
  // purpose, as nothing can end them safely.
  template <class T>
  std::optional<T> wait(Task<T> task);
  bool hang(const std::string& what);
  uint64_t below(uint64_t n) { return n == 0 ? 0 : std::uniform_int_distribution<uint64_t>(0, n - 1)(rng_); }

  // ---- checking (seed_checks.cc) ---------------------------------------------
  // The effects `op` may have had on the guest as seen at `cut` (kNever: at
  // the end of the batch; else a crash at that tick).
  void add_effects(History& history, const Op& op, uint64_t cut) const;
  bool check_batch();
  bool check_read_back(const History& history, std::vector<uint8_t>& disk);
  bool check_snapshots(const History& history);
  std::optional<std::vector<uint8_t>> read_disk(qcow2::Qcow2Image& image, const std::string& what);
  std::optional<std::vector<uint8_t>> read_snapshot(const std::string& name, uint64_t& size);
  bool check_metadata(std::shared_ptr<SimStorage> file, bool strict, const std::string& when,
                      bool copied_window_possible = false);
  bool check_crash();
  // ---- the dirty bitmap of bitmap seeds ---------------------------------------
  // Adds it, then closes and reopens the image so that it is on disk (and
  // in use) before the first batch.
  bool add_bitmap();
  // What an op's completion (or a resize) tells about the bitmap.
  void track_bitmap(const Op& op);
  // After a batch: every granule an op with an effect touched is dirty, and
  // no granule is dirty that no modifying op (or resize) touched.
  bool check_bitmap();
  // A crash image's bitmap: inconsistent, or consistent and never calling
  // clean a granule that changed after it was stored.
  bool check_crash_bitmap(qcow2::Qcow2Image& image, const History& history, const std::vector<uint8_t>& bytes);
  bool check_grown_back(qcow2::Qcow2Image& image, const std::vector<uint8_t>& bytes);
  // "" when the bytes of a disk opened at a snapshot of `size` bytes are
  // what may lie past that size; else the first that is not.
  std::string past_snapshot_end(std::span<const uint8_t> bytes, uint64_t size) const;
  bool finish();
  bool check_with_qemu(const std::vector<uint8_t>& file, bool final);
  bool fail(const std::string& what, const std::string& detail);

  const Layout& layout_;
  const LayoutImages& images_;
  const uint64_t seed_;
  const SeedOptions options_;
  std::mt19937_64 rng_;        // the workload and the driver's choices
  std::mt19937_64 crash_rng_;  // what a crash keeps
  SimScheduler scheduler_;
  Workload workload_;
  std::shared_ptr<SimStorage> storage_;
  std::shared_ptr<SimStorage> backing_storage_;
  std::unique_ptr<qcow2::Qcow2Image> image_;
  // The exact guest content at the start of the batch (max_size_ bytes,
  // zeros past size_).
  std::shared_ptr<const std::vector<uint8_t>> model_;
  uint64_t size_ = 0;
  uint64_t max_size_ = 0, min_size_ = 0;
  // The backing file's guest content (backing layouts): what a cluster left
  // unallocated reads as.
  std::shared_ptr<const std::vector<uint8_t>> backing_content_;
  std::map<std::string, Snapshot> snapshots_;
  // Bitmap seeds (half the seeds of layouts that can store bitmaps): one
  // enabled bitmap kBitmapName; `must_dirty_` holds what it must have
  // marked, `may_dirty_` what it may have (every modifying op, effect or
  // not, and the ranges resizes touched).
  std::optional<uint64_t> bitmap_granularity_;
  std::optional<DirtyBitmap> must_dirty_, may_dirty_;
  uint64_t clock_ = 0;  // the driver's logical clock (op ticks)
  uint64_t next_op_ = 1;
  bool hung_ = false;

  // The batch in progress.
  std::vector<std::unique_ptr<Op>> ops_;
  WorkloadState state_;
  uint64_t batch_index_ = 0, batch_start_ = 0, depth_ = 0, in_flight_ = 0;
  uint64_t resizes_in_flight_ = 0, resizes_issued_ = 0;
  uint64_t batch_start_size_ = 0;
  uint64_t shrink_to_ = kNever;  // the new size of a shrink issued in the batch
  struct Crash {
    bool taken = false;
    uint64_t tick = 0;
    std::vector<uint8_t> image;
  } crash_;

  SeedReport report_;
};

namespace detail {
template <class T>
Task<void> capture(Task<T> task, std::optional<T>& out) {
  out.emplace(co_await std::move(task));
}
}  // namespace detail

template <class T>
std::optional<T> SeedRun::wait(Task<T> task) {
  std::optional<T> out;
  auto group = std::make_unique<TaskGroup>();
  group->spawn(detail::capture(std::move(task), out));
  this_thread_ready_queue().drain();
  while (!out) {
    if (!scheduler_.run_once()) {
      (void)group.release();  // suspended forever: leaked, see above
      hung_ = true;
      return std::nullopt;
    }
  }
  return out;
}

}  // namespace uqcow::sim
