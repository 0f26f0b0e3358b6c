// Debug events: QEMU's BLKDBG_EVENT points, named as blkdebug names them
// (docs/devel/blkdebug and block/blkdebug.c). A format driver announces on
// the BlockDevice it writes to that it is about to do a step (update an L2
// table, grow the refcount table...), just before the I/O of that step; a
// fault-injecting layer keys its rules on these events. The BlockDevice
// (uring/block_device.h) carries an event as a bare id and knows none of
// these names. snapshot_update
// (before the header switches to a new snapshot table) is uqcow's own.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace uqcow {

#define UQCOW_BLKDBG_EVENTS(X)                                         \
  X(kL1Update, "l1_update")                                            \
  X(kL1GrowAllocTable, "l1_grow_alloc_table")                          \
  X(kL1GrowWriteTable, "l1_grow_write_table")                          \
  X(kL1GrowActivateTable, "l1_grow_activate_table")                    \
  X(kL1ShrinkWriteTable, "l1_shrink_write_table")                      \
  X(kL1ShrinkFreeL2Clusters, "l1_shrink_free_l2_clusters")             \
  X(kL2Load, "l2_load")                                                \
  X(kL2Update, "l2_update")                                            \
  X(kL2UpdateCompressed, "l2_update_compressed")                       \
  X(kL2AllocCowRead, "l2_alloc_cow_read")                              \
  X(kL2AllocWrite, "l2_alloc_write")                                   \
  X(kReadAio, "read_aio")                                              \
  X(kReadBackingAio, "read_backing_aio")                               \
  X(kReadCompressed, "read_compressed")                                \
  X(kWriteAio, "write_aio")                                            \
  X(kWriteCompressed, "write_compressed")                              \
  X(kCowRead, "cow_read")                                              \
  X(kCowWrite, "cow_write")                                            \
  X(kReftableLoad, "reftable_load")                                    \
  X(kReftableGrow, "reftable_grow")                                    \
  X(kRefblockLoad, "refblock_load")                                    \
  X(kRefblockUpdate, "refblock_update")                                \
  X(kRefblockAlloc, "refblock_alloc")                                  \
  X(kRefblockAllocHookup, "refblock_alloc_hookup")                     \
  X(kRefblockAllocWrite, "refblock_alloc_write")                       \
  X(kRefblockAllocWriteBlocks, "refblock_alloc_write_blocks")          \
  X(kRefblockAllocWriteTable, "refblock_alloc_write_table")            \
  X(kRefblockAllocSwitchTable, "refblock_alloc_switch_table")          \
  X(kClusterAlloc, "cluster_alloc")                                    \
  X(kClusterAllocBytes, "cluster_alloc_bytes")                         \
  X(kClusterAllocSpace, "cluster_alloc_space")                         \
  X(kClusterFree, "cluster_free")                                      \
  X(kFlushToOs, "flush_to_os")                                         \
  X(kFlushToDisk, "flush_to_disk")                                     \
  X(kPwritevZero, "pwritev_zero")                                      \
  X(kSnapshotUpdate, "snapshot_update")

enum class BlkDebugEvent : uint8_t {
#define UQCOW_BLKDBG_ENUM(id, name) id,
  UQCOW_BLKDBG_EVENTS(UQCOW_BLKDBG_ENUM)
#undef UQCOW_BLKDBG_ENUM
      kCount
};

inline constexpr unsigned kBlkDebugEventCount = static_cast<unsigned>(BlkDebugEvent::kCount);

// blkdebug's name of the event ("l2_update").
std::string_view blkdebug_event_name(BlkDebugEvent event);
// The event with that blkdebug name, if any.
std::optional<BlkDebugEvent> parse_blkdebug_event(std::string_view name);

}  // namespace uqcow
