#include "nbd/block_status.h"

#include <algorithm>
#include <string>

#include "nbd/session.h"

namespace uqcow::nbd {
namespace {

// NBD_STATE_* of one range: data is data (also where a metadata-
// preallocated layer's host file has a hole); zeros are a hole unless they
// keep a host cluster; a range no layer allocates (or past the end of a
// shorter backing file) is a hole.
uint32_t nbd_state(const ChainStatus& st) {
  if (!st.allocated) return kStateHole | kStateZero;
  if (st.data) return 0;
  return st.has_offset ? kStateZero : kStateHole | kStateZero;
}

// Bytes one chunk's header, context id and `limit` descriptors take.
constexpr size_t chunk_capacity(size_t limit) { return ChunkHeader::kSize + 4 + 8 * limit; }

}  // namespace

// One chunk written at the end of the reply buffer: header and context id
// first, descriptors appended, the header filled in by finish(). The buffer
// has room for the whole chunk before it starts (build() reserves it), so
// appending never reallocates.
class BlockStatusResponder::Chunk {
 public:
  Chunk(std::vector<std::byte>& out, uint32_t context_id, size_t limit)
      : out_(out), start_(out.size()), limit_(limit) {
    out_.resize(start_ + ChunkHeader::kSize + 4);
    store_be32(out_.data() + start_ + ChunkHeader::kSize, context_id);
  }

  // Appends a descriptor, or lengthens the last one when its flags are the
  // same. False when the chunk is full: the caller stops there, and the
  // chunk covers less than the request. Lengths fit u32: together they
  // cover at most the request, whose length is a u32.
  bool add(uint64_t len, uint32_t flags) {
    if (count_ > 0 && flags == last_flags_) {
      last_len_ += static_cast<uint32_t>(len);
      store_be32(out_.data() + out_.size() - 8, last_len_);
      return true;
    }
    if (count_ == limit_) return false;
    out_.resize(out_.size() + 8);
    last_len_ = static_cast<uint32_t>(len);
    last_flags_ = flags;
    store_be32(out_.data() + out_.size() - 8, last_len_);
    store_be32(out_.data() + out_.size() - 4, flags);
    ++count_;
    return true;
  }

  void finish(uint64_t handle, bool last) {
    const auto payload = static_cast<uint32_t>(out_.size() - start_ - ChunkHeader::kSize);
    ChunkHeader{static_cast<uint16_t>(last ? kReplyFlagDone : 0), kReplyTypeBlockStatus, handle, payload}
        .store(out_.data() + start_);
  }

 private:
  std::vector<std::byte>& out_;
  const size_t start_;
  const size_t limit_;
  size_t count_ = 0;
  uint32_t last_len_ = 0;
  uint32_t last_flags_ = 0;
};

BlockStatusResponder::BlockStatusResponder(const Export& exp) : exp_(exp), chain_status_(*exp.disk) {}

Task<Status> BlockStatusResponder::base_allocation(uint64_t offset, uint64_t end, Chunk& chunk) {
  while (offset < end) {
    UQ_CO_ASSIGN_OR_RETURN(ChainStatus st, co_await chain_status_.status(offset, end - offset));
    if (!chunk.add(st.length, nbd_state(st))) break;
    offset += st.length;
  }
  co_return ok_status();
}

Task<Status> BlockStatusResponder::allocation_depth(uint64_t offset, uint64_t end, Chunk& chunk) {
  while (offset < end) {
    UQ_CO_ASSIGN_OR_RETURN(AllocationDepth d, co_await uqcow::allocation_depth(*exp_.disk, offset, end - offset));
    if (!chunk.add(d.length, d.depth)) break;
    offset += d.length;
  }
  co_return ok_status();
}

// A bitmap shorter than the export (one found in a shorter backing file) is
// clean past its end.
Status BlockStatusResponder::dirty_bitmap(const DirtyBitmap& bitmap, uint64_t offset, uint64_t end,
                                          Chunk& chunk) {
  const uint64_t tracked_end = std::min(end, bitmap.size());
  while (offset < tracked_end) {
    bool dirty = false;
    const uint64_t len = bitmap.run_length(offset, tracked_end - offset, &dirty);
    if (len == 0 || len > tracked_end - offset) {
      return Error(EIO, "dirty bitmap run of " + std::to_string(len) + " bytes at offset " +
                            std::to_string(offset));
    }
    if (!chunk.add(len, dirty ? kStateDirty : 0)) return ok_status();
    offset += len;
  }
  if (offset < end) chunk.add(end - offset, 0);
  return ok_status();
}

Task<Status> BlockStatusResponder::build(const Request& req, const MetaContexts& selected,
                                         std::vector<std::byte>& out) {
  const size_t limit = (req.flags & kCmdFlagReqOne) ? 1 : kMaxExtents;
  size_t remaining = selected.count();
  out.clear();
  out.reserve(remaining * chunk_capacity(limit));
  const uint64_t offset = req.offset, end = req.offset + req.length;
  if (selected.base_allocation) {
    Chunk chunk(out, kBaseAllocationId, limit);
    UQ_CO_TRY(co_await base_allocation(offset, end, chunk));
    chunk.finish(req.handle, --remaining == 0);
  }
  if (selected.allocation_depth) {
    Chunk chunk(out, kAllocationDepthId, limit);
    UQ_CO_TRY(co_await allocation_depth(offset, end, chunk));
    chunk.finish(req.handle, --remaining == 0);
  }
  const auto& bitmaps = exp_.contexts.bitmaps;
  for (size_t i = 0; i < bitmaps.size(); ++i) {
    if (!selected.bitmap(i)) continue;
    Chunk chunk(out, kDirtyBitmapId + static_cast<uint32_t>(i), limit);
    UQ_CO_TRY(dirty_bitmap(*bitmaps[i].bitmap, offset, end, chunk));
    chunk.finish(req.handle, --remaining == 0);
  }
  co_return ok_status();
}

}  // namespace uqcow::nbd
