// Disk: the guest-visible view of an image, whatever its format (qcow2 or
// raw). The CLI, the benchmark and the NBD server work on Disks; a qcow2
// image's backing file is a Disk too.
//
// All methods must be called on the thread whose reactor the disk was opened
// on. Ranges are bytes; any offset and length within size() is accepted.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "block/dirty_bitmap.h"
#include "engine/result.h"
#include "engine/task.h"

namespace uqcow {

// How one range of a single layer is stored (no backing lookup).
struct BlockStatus {
  enum class Kind {
    kUnallocated,  // not in this layer: the backing file (or zeros) decides
    kZero,         // reads as zeros
    kData,         // data stored in this layer
  };
  Kind kind = Kind::kUnallocated;
  uint64_t length = 0;        // bytes from the queried offset with this status
  bool has_offset = false;    // data (or preallocated zeros) at host_offset
  uint64_t host_offset = 0;
  bool compressed = false;
  const std::string* file = nullptr;  // the file holding host_offset
};

class Disk {
 public:
  virtual ~Disk() = default;

  virtual uint64_t size() const = 0;
  virtual bool read_only() const = 0;
  virtual std::string format_name() const = 0;
  virtual const std::string& filename() const = 0;
  // The next layer of the chain, or nullptr.
  virtual Disk* backing() const = 0;

  // Reads buf.size() bytes at `offset` (guest view, backing included).
  // EINVAL if the range exceeds size(); EIO (with a message) on corruption.
  virtual Task<Status> read(uint64_t offset, std::span<std::byte> buf) = 0;
  virtual Task<Status> write(uint64_t offset, std::span<const std::byte> buf) = 0;
  // Makes the range read as zeros; may_unmap lets the layer deallocate.
  virtual Task<Status> write_zeroes(uint64_t offset, uint64_t len, bool may_unmap) = 0;
  virtual Task<Status> discard(uint64_t offset, uint64_t len) = 0;
  virtual Task<Status> flush() = 0;
  // Status of [offset, offset + max_len) in this layer only; result.length
  // is > 0 and <= max_len.
  virtual Task<Result<BlockStatus>> block_status(uint64_t offset, uint64_t max_len) = 0;
  // Flushes and releases everything. After close() only the destructor may
  // be called. Closing twice is harmless.
  virtual Task<Status> close() = 0;
  // Bytes the image occupies on the host (qemu-img's "disk size").
  virtual Result<uint64_t> allocated_bytes() const = 0;
  // The persistent dirty bitmap `name` of this layer, ready to read (NBD's
  // qemu:dirty-bitmap:NAME, convert --bitmaps, bitmap --merge): ENOENT if
  // there is none, EINVAL if it is inconsistent (left in use by a crash).
  // The pointer stays valid until the bitmap is removed or the disk closed.
  virtual Result<const DirtyBitmap*> dirty_bitmap(const std::string& name) const {
    return Error(ENOENT, "Dirty bitmap '" + name + "' not found");
  }
};

}  // namespace uqcow
