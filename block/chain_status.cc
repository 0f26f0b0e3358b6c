#include "block/chain_status.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

#include "block/endian.h"
#include "qcow2/format.h"
#include "qcow2/image.h"
#include "qcow2/refcount_entry.h"
#include "uring/raw_file.h"

namespace uqcow {
namespace {

std::span<std::byte> as_bytes(std::vector<uint8_t>& v) {
  return {reinterpret_cast<std::byte*>(v.data()), v.size()};
}

// QEMU's qcow2_detect_metadata_preallocation(): true when the clusters of the
// image file with a non-zero refcount clearly outnumber the clusters the file
// really has allocated (preallocation=metadata leaves the data as holes).
// Counting stops at the threshold, so a large image costs little.
Task<Result<bool>> detect_metadata_preallocation(const qcow2::Qcow2Image& img) {
  const qcow2::Header& h = img.header();
  UQ_CO_ASSIGN_OR_RETURN(auto file, RawFile::open(img.filename(), RawFileOptions{.read_only = true}));
  UQ_CO_ASSIGN_OR_RETURN(uint64_t length, file->length());
  UQ_CO_ASSIGN_OR_RETURN(uint64_t allocated, file->allocated_bytes());

  const uint64_t cluster_size = h.cluster_size();
  const uint64_t real_clusters = allocated / cluster_size;
  const uint64_t threshold = std::max(real_clusters * 10 / 9, real_clusters + 2);
  const uint64_t end_cluster = (length + cluster_size - 1) / cluster_size;

  // refcount_table_clusters is bounded by parse_header (8 MiB).
  std::vector<uint8_t> table(uint64_t{h.refcount_table_clusters} * cluster_size);
  UQ_CO_TRY(co_await file->co_read(h.refcount_table_offset, as_bytes(table)));
  const uint64_t per_block = cluster_size * 8 / h.refcount_bits();
  std::vector<uint8_t> block(cluster_size);
  uint64_t count = 0;
  for (uint64_t i = 0; i < end_cluster && count < threshold;) {
    const uint64_t table_index = i / per_block;
    const uint64_t block_end = std::min(end_cluster, (table_index + 1) * per_block);
    uint64_t block_offset = 0;
    if (table_index < table.size() / 8) {
      block_offset = load_be64(&table[table_index * 8]) & qcow2::kReftableOffsetMask;
    }
    if (block_offset == 0) {  // no refcount block: every refcount is 0
      i = block_end;
      continue;
    }
    UQ_CO_TRY(co_await file->co_read(block_offset, as_bytes(block)));
    for (; i < block_end && count < threshold; ++i) {
      count += qcow2::get_refcount_entry(block.data(), i % per_block, h.refcount_order) != 0;
    }
  }
  co_return count >= threshold;
}

// One layer's status with the Disk contract checked: a caller looping on
// the result would otherwise spin forever (length 0) or run past its range.
Task<Result<BlockStatus>> checked_status(Disk& layer, uint64_t offset, uint64_t len) {
  UQ_CO_ASSIGN_OR_RETURN(BlockStatus st, co_await layer.block_status(offset, len));
  if (st.length == 0 || st.length > len) {
    co_return Error(EIO, layer.filename() + ": block status at offset " + std::to_string(offset) +
                             " returned " + std::to_string(st.length) + " bytes for a request of " +
                             std::to_string(len));
  }
  co_return st;
}

}  // namespace

Task<Result<AllocationDepth>> allocation_depth(Disk& top, uint64_t offset, uint64_t max_len) {
  AllocationDepth result{.length = max_len, .depth = 1};
  Disk* layer = &top;
  for (;;) {
    UQ_CO_ASSIGN_OR_RETURN(BlockStatus st, co_await checked_status(*layer, offset, result.length));
    // Invariant: every layer above `layer` leaves [offset, offset + length)
    // unallocated, and length only shrinks as the walk goes down.
    result.length = st.length;
    if (st.kind != BlockStatus::Kind::kUnallocated) co_return result;
    Disk* backing = layer->backing();
    if (!backing) {
      result.depth = 0;
      co_return result;
    }
    ++result.depth;
    if (offset >= backing->size()) co_return result;  // zeros synthesised in `backing`
    result.length = std::min(result.length, backing->size() - offset);
    layer = backing;
  }
}

Task<Result<bool>> ChainStatusReader::metadata_preallocated(Disk& layer) {
  auto it = preallocated_.find(&layer);
  if (it != preallocated_.end()) co_return it->second;
  bool preallocated = false;
  if (auto* img = dynamic_cast<qcow2::Qcow2Image*>(&layer)) {
    // Like QEMU, a failed detection only means "no": the answer refines the
    // status, it is not needed for correctness.
    auto detected = co_await detect_metadata_preallocation(*img);
    preallocated = detected.ok() && *detected;
  }
  preallocated_[&layer] = preallocated;
  co_return preallocated;
}

Result<bool> ChainStatusReader::host_file_zero(const std::string& file, uint64_t offset,
                                               uint64_t& len) {
  auto it = host_fds_.find(file);
  if (it == host_fds_.end()) {
    it = host_fds_.emplace(file, FileDesc(::open(file.c_str(), O_RDONLY | O_CLOEXEC))).first;
  }
  const int fd = it->second.get();
  if (fd < 0) return Error(EBADF, "cannot open " + file);
  struct stat st {};
  if (fstat(fd, &st) != 0) return errno_error(errno, "stat " + file);
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  // Past the end of the file, and in a hole that runs to its end, the whole
  // range reads as zeros (QEMU: BDRV_BLOCK_EOF with ZERO or an empty extent).
  if (offset >= file_size) return true;
  const uint64_t n = std::min(len, file_size - offset);
  off_t data = lseek(fd, static_cast<off_t>(offset), SEEK_DATA);
  if (data < 0 && errno == ENXIO) return true;
  if (data < 0) {  // no information: all data, as far as the file goes
    len = n;
    return false;
  }
  if (static_cast<uint64_t>(data) > offset) {
    len = std::min<uint64_t>(n, static_cast<uint64_t>(data) - offset);
    return true;
  }
  off_t hole = lseek(fd, static_cast<off_t>(offset), SEEK_HOLE);
  len = hole > static_cast<off_t>(offset) ? std::min<uint64_t>(n, static_cast<uint64_t>(hole) - offset)
                                          : n;
  return false;
}

Task<Result<BlockStatus>> ChainStatusReader::layer_status(Disk& layer, uint64_t offset,
                                                          uint64_t max_len, bool& host_zero) {
  host_zero = false;
  auto st = co_await checked_status(layer, offset, max_len);
  if (!st.ok()) co_return st;
  if (st->kind == BlockStatus::Kind::kData && st->has_offset && st->file) {
    auto preallocated = co_await metadata_preallocated(layer);
    if (preallocated.ok() && *preallocated) {
      uint64_t len = st->length;
      auto zero = host_file_zero(*st->file, st->host_offset, len);
      if (zero.ok()) {  // errors are ignored, as QEMU ignores them here
        st->length = len;
        host_zero = *zero;
      }
    }
  }
  co_return st;
}

Task<Result<ChainStatus>> ChainStatusReader::status(uint64_t offset, uint64_t max_len) {
  ChainStatus cs;
  Disk* layer = &top_;
  uint64_t len = max_len;
  for (;;) {
    bool host_zero = false;
    UQ_CO_ASSIGN_OR_RETURN(BlockStatus st, co_await layer_status(*layer, offset, len, host_zero));
    len = st.length;
    if (st.kind != BlockStatus::Kind::kUnallocated) {
      cs.allocated = true;
      cs.zero = st.kind == BlockStatus::Kind::kZero || host_zero;
      cs.data = st.kind == BlockStatus::Kind::kData;
      cs.has_offset = st.has_offset;
      cs.offset = st.host_offset;
      cs.file = st.has_offset ? st.file : nullptr;
      break;
    }
    Disk* backing = layer->backing();
    if (!backing || offset >= backing->size()) {
      // A preallocated but unallocated range (extended L2) keeps its host
      // offset, as in QEMU.
      cs.zero = true;
      cs.past_backing_end = backing != nullptr;
      cs.has_offset = st.has_offset;
      cs.offset = st.host_offset;
      cs.file = st.has_offset ? st.file : nullptr;
      break;
    }
    // The backing file clamps `len` to its own end.
    layer = backing;
    ++cs.depth;
  }
  cs.length = len;
  co_return cs;
}

}  // namespace uqcow
