// What the crash and fault tests use to judge persistent dirty bitmaps
// (issue 15) against QEMU and against a model of the guest's requests:
// the bitmaps qemu-img info lists, the dirty extents qemu-nbd exports
// (nbdinfo --map), a per-granule model of what the requests marked, and
// the counts qemu-img check and uqcow check report.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "block/dirty_bitmap.h"
#include "tests/testutil.h"

namespace uqcow::testing {

// Dirty (offset, length) extents, adjacent ones merged, in offset order.
using Extents = std::vector<std::pair<uint64_t, uint64_t>>;

// One bitmap as `qemu-img info --output=json` lists it.
struct QemuBitmap {
  std::string name;
  uint64_t granularity = 0;
  bool in_use = false;  // the "in-use" flag: inconsistent for any reader
  bool enabled = false; // "auto"
};

// The bitmaps of `path` by qemu-img info -U (empty if it lists none);
// nullopt if qemu-img info cannot read the image.
std::optional<std::vector<QemuBitmap>> qemu_bitmaps(const std::string& path);
const QemuBitmap* find_bitmap(const std::vector<QemuBitmap>& list, const std::string& name);

// The dirty extents of bitmap `name` as qemu-nbd -B exports them, read with
// nbdinfo --map=qemu:dirty-bitmap:NAME. nullopt (and a gtest failure) if
// the export or the map failed.
std::optional<Extents> qemu_dirty_extents(const std::string& path, const std::string& name);

// The dirty extents of `bits`, merged like qemu_dirty_extents().
Extents extents_of(const DirtyBitmap& bits);

// The expected bitmap: one flag per granule of a disk, set by mark() the
// way QEMU marks a request's range (every granule it touches).
class BitmapModel {
 public:
  BitmapModel(uint64_t disk_size, uint64_t granularity)
      : size_(disk_size), granularity_(granularity), dirty_((disk_size + granularity - 1) / granularity, 0) {}
  void mark(uint64_t offset, uint64_t length);
  // A disk size change: granules past the new end go, new ones are clean.
  void resize(uint64_t new_size);
  bool dirty(uint64_t granule) const { return dirty_[granule]; }
  uint64_t granularity() const { return granularity_; }
  Extents extents() const;
  // Whether `bits` marks exactly the model's granules (and has its size and
  // granularity); the first difference otherwise.
  ::testing::AssertionResult matches(const DirtyBitmap& bits) const;
  // Whether every granule the model marks is dirty in `bits` (extra dirty
  // granules allowed).
  ::testing::AssertionResult covered_by(const DirtyBitmap& bits) const;

 private:
  uint64_t size_, granularity_;
  std::vector<uint8_t> dirty_;
};

// The failures the running test has recorded so far (to tell whether a
// helper added one).
int failures_so_far();

// qemu-img check's and uqcow check's verdict in numbers, from their human
// output: "N errors were found", "N leaked clusters were found".
struct CheckCounts {
  int exit_code = -1;
  uint64_t corruptions = 0;
  uint64_t leaks = 0;
  bool operator==(const CheckCounts&) const = default;
};
CheckCounts check_counts(const CommandResult& r);
std::string describe(const CheckCounts& c);

// uqcow check of `path` reports the corruption and leak counts that
// `qemu_check` (qemu-img check's run on it) reported. False if not.
bool counts_agree(const std::string& path, const CommandResult& qemu_check, const std::string& where);

// For an image with bitmaps, maybe left in use, before any repair
// (`qemu_check` is qemu-img check's run on it): uqcow check reports the
// same corruption and leak counts; on a copy, `uqcow check -r all` leaves
// it clean for qemu-img check with no bitmap in use; on another copy,
// `qemu-img check -r all` (which keeps bitmaps in use) leaves it clean for
// uqcow check too. Reports failures with `where`; false if any.
bool checks_agree_and_repair(const std::string& path, const CommandResult& qemu_check, const std::string& where);

}  // namespace uqcow::testing
