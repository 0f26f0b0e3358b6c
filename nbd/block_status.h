// NBD_CMD_BLOCK_STATUS replies: one NBD_REPLY_TYPE_BLOCK_STATUS chunk per
// selected metadata context, in MetaContexts order, the last one with
// NBD_REPLY_FLAG_DONE (as qemu-nbd answers).
//
// Descriptors (proto.md, "NBD_REPLY_TYPE_BLOCK_STATUS"): each chunk starts
// at the request's offset, its descriptors have non-zero lengths, adjacent
// ones differ in flags, and together they cover at most the request's
// length (they may stop short: at kMaxExtents descriptors, or after the
// first one with REQ_ONE). Each context's flags:
// - base:allocation: NBD_STATE_HOLE / NBD_STATE_ZERO through the backing
//   chain (block/chain_status.h);
// - qemu:allocation-depth: the depth itself (0 unallocated, 1 the top
//   image, 2 its backing file, ...);
// - qemu:dirty-bitmap:NAME: NBD_STATE_DIRTY where the bitmap is dirty, read
//   at the time of the request.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "block/chain_status.h"
#include "engine/result.h"
#include "engine/task.h"
#include "nbd/meta_context.h"
#include "nbd/protocol.h"

namespace uqcow::nbd {

struct Export;

// Descriptors per chunk (bounds the reply and the time spent).
constexpr size_t kMaxExtents = 1024;

class BlockStatusResponder {
 public:
  explicit BlockStatusResponder(const Export& exp);
  BlockStatusResponder(const BlockStatusResponder&) = delete;
  BlockStatusResponder& operator=(const BlockStatusResponder&) = delete;

  // Builds the whole reply to `req` (validated: in range, non-zero length)
  // for the contexts in `selected` (at least one) into `out`, replacing its
  // contents; `out` is allocated once, at its final capacity. On error
  // nothing is to be sent but the error.
  Task<Status> build(const Request& req, const MetaContexts& selected, std::vector<std::byte>& out);

 private:
  class Chunk;
  Task<Status> base_allocation(uint64_t offset, uint64_t end, Chunk& chunk);
  Task<Status> allocation_depth(uint64_t offset, uint64_t end, Chunk& chunk);
  static Status dirty_bitmap(const DirtyBitmap& bitmap, uint64_t offset, uint64_t end, Chunk& chunk);

  const Export& exp_;
  ChainStatusReader chain_status_;
};

}  // namespace uqcow::nbd
