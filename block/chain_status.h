// Block status through a backing chain, computed the way QEMU's generic block
// layer does for qemu-img (bdrv_block_status with want_zero), so that `map`
// prints what qemu-img map prints and `compare` / `convert` can skip ranges
// known to read as zeros without reading them.
//
// A Disk's block_status() describes one layer only. On top of it this adds
// what block/io.c adds:
// - an unallocated range goes to the backing file (depth + 1); past the end
//   of a shorter backing file, or with no backing file at all, it reads as
//   zeros and is reported at the layer that deferred;
// - a qcow2 image with metadata preallocation (more clusters referenced than
//   the file has allocated, qcow2_detect_metadata_preallocation()) asks the
//   host file about data ranges: where the host file has a hole, the data
//   reads as zeros (QEMU's BDRV_BLOCK_RECURSE).
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "block/disk.h"
#include "engine/result.h"
#include "engine/task.h"
#include "uring/file_desc.h"

namespace uqcow {

// The flags of QEMU's bdrv_block_status() for one range.
struct ChainStatus {
  uint64_t length = 0;      // bytes from the queried offset with this status
  int depth = 0;            // layer that decided: 0 is the top image
  bool allocated = false;   // stored in layer `depth` (BDRV_BLOCK_ALLOCATED)
  bool zero = false;        // reads as zeros (BDRV_BLOCK_ZERO)
  bool data = false;        // BDRV_BLOCK_DATA
  bool has_offset = false;  // BDRV_BLOCK_OFFSET_VALID: `offset` in `file`
  uint64_t offset = 0;
  const std::string* file = nullptr;
  // Layer `depth` defers to a backing file that ends before the range: the
  // zeros are synthesised below it (bdrv_block_status_above() reports them as
  // allocated, bdrv_block_status() of the layer does not).
  bool past_backing_end = false;
};

// Which layer of the chain allocates a range, as QEMU's
// bdrv_is_allocated_above(top, NULL, false, ...) reports it for qemu-nbd's
// qemu:allocation-depth: 0 no layer does (the range reads as zeros), 1 the
// top image, 2 its backing file, and so on. A range past the end of a
// shorter backing file counts as allocated in that backing file (QEMU
// synthesises its zeros there). Allocated means data or zeros recorded in
// the layer (want_zero off: no host-file refinement).
struct AllocationDepth {
  uint64_t length = 0;  // bytes from the queried offset at this depth
  uint32_t depth = 0;
};

// Needs offset < top.size() and max_len > 0; the result's length is in
// (0, max_len]. EIO if a layer's block_status breaks the Disk contract.
Task<Result<AllocationDepth>> allocation_depth(Disk& top, uint64_t offset, uint64_t max_len);

class ChainStatusReader {
 public:
  explicit ChainStatusReader(Disk& top) : top_(top) {}
  ChainStatusReader(const ChainStatusReader&) = delete;
  ChainStatusReader& operator=(const ChainStatusReader&) = delete;

  // Status of [offset, offset + max_len); needs offset < top.size() and
  // max_len > 0. The result's length is in (0, max_len].
  Task<Result<ChainStatus>> status(uint64_t offset, uint64_t max_len);

 private:
  // One layer's status, refined by its host file when it is a qcow2 image
  // with metadata preallocation.
  Task<Result<BlockStatus>> layer_status(Disk& layer, uint64_t offset, uint64_t max_len,
                                         bool& host_zero);
  Task<Result<bool>> metadata_preallocated(Disk& layer);
  // The host file's view of [offset, offset + len): sets `len` to the length
  // of the first extent and returns whether it reads as zeros.
  Result<bool> host_file_zero(const std::string& file, uint64_t offset, uint64_t& len);

  Disk& top_;
  std::map<const Disk*, bool> preallocated_;
  std::map<std::string, FileDesc> host_fds_;  // invalid: could not be opened
};

}  // namespace uqcow
