// AllocatingWriter: the write path that changes the mapping, QEMU's
// qcow2-cluster.c allocation half (handle_copied, handle_alloc, the
// QCowL2Meta COW regions, qcow2_alloc_cluster_link_l2) and l2_allocate.
//
// One step of an allocating write (write_step), entered with the metadata
// lock held and the allocations in flight it depends on already waited for:
//   plan the run of clusters in one L2 slice (in place, in place + relink,
//   or fresh clusters); allocate host clusters; register the run in flight
//   (AllocationsInFlight); unlock; read copy-on-write data and write head +
//   guest data + tail as ONE writev; lock; link the L2 entries, checking each
//   is still the one the plan saw; hand replaced clusters to FreedClusters;
//   unregister.
//
// On-disk ordering: the refcount blocks that count a new cluster reach the
// disk before the L2 entry that points at it (the L2 cache depends on the
// refcount cache, unless refcounts are lazy); the guest and COW data reach
// the disk before the entries (set_depends_on_flush); a new L2 table and its
// refcount reach the disk before the L1 entry that points at it.
//
// Every member runs on the image's reactor thread; the caller holds the
// metadata lock (write_step releases and re-takes it through the guard).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>

#include "engine/co_mutex.h"
#include "engine/result.h"
#include "engine/task.h"
#include "qcow2/cluster_map.h"
#include "qcow2/corruption.h"
#include "qcow2/encryption.h"
#include "qcow2/freed_clusters.h"
#include "qcow2/header.h"
#include "qcow2/inflight.h"
#include "qcow2/overlap_guard.h"
#include "qcow2/refcounts.h"
#include "uring/block_device.h"

namespace uqcow::qcow2 {

class AllocatingWriter {
 public:
  // The guest's view of [guest, guest + out.size()) as a read sees it now,
  // zeros past the end of the disk: the copy-on-write source. Called with
  // the lock released, inside the write's request (it must not wait to be
  // admitted), while the range is registered in flight.
  using GuestReader = std::function<Task<Status>(uint64_t guest, std::span<std::byte> out)>;

  // The components it works on, all owned by the image.
  struct Parts {
    BlockDevice& file;       // the qcow2 file (metadata)
    BlockDevice& data_file;  // guest data: the qcow2 file or the external one
    const Header& header;
    const Geometry& geo;
    ClusterMap& map;
    Refcounts& refcounts;
    AllocationsInFlight& inflight;
    FreedClusters& freed;
    OverlapGuard& overlap;
    CorruptionReporter& reporter;
    CoMutex& lock;  // the metadata lock write_step re-takes
  };
  struct Options {
    bool lazy_refcounts = false;
    // Size of the backing file; none: unallocated clusters read as zeros.
    std::optional<uint64_t> backing_size;
    ImageEncryption* crypto = nullptr;  // data is stored encrypted
  };
  AllocatingWriter(Parts parts, Options options, GuestReader read_guest)
      : p_(parts), o_(options), read_guest_(std::move(read_guest)) {}
  AllocatingWriter(const AllocatingWriter&) = delete;
  AllocatingWriter& operator=(const AllocatingWriter&) = delete;

  // Writes a prefix of `buf` at guest `offset` and returns its length:
  // the clusters from `offset` within one L2 slice that can be handled
  // alike, at most 2 MiB (or one cluster). The lock is held through `guard`
  // on entry, and no allocation in flight overlaps the range
  // (AllocationsInFlight::wait_for_dependencies); on return the guard may
  // have been released (an in-place write needs no relink). Damage met in
  // an entry it would replace or keep is reported fatal before anything is
  // written.
  Task<Result<size_t>> write_step(uint64_t offset, std::span<const std::byte> buf, CoMutex::Guard& guard);

  // QEMU's get_cluster_table + l2_allocate: the host offset of an L2 table
  // with refcount 1 (OFLAG_COPIED) for guest `offset`, allocating a fresh
  // one or copying a shared one (its reference then dropped). The new table
  // and its refcount are on disk before the L1 entry is. Lock held.
  Task<Result<uint64_t>> writable_l2_table(uint64_t offset);

  // Host offset for n new data clusters starting at guest cluster `guest`:
  // fresh clusters of the qcow2 file, or, with an external data file, the
  // guest offset itself (nothing is allocated). Lock held.
  Task<Result<uint64_t>> alloc_data_clusters(uint64_t guest, uint64_t n);

 private:
  struct Plan;
  Task<Result<size_t>> write_run(const Plan& plan, uint64_t offset, std::span<const std::byte> data,
                                 CoMutex::Guard& guard);
  // Does the guest see zeros in [from, to) of a cluster being replaced,
  // judged from its old mapping alone (no I/O)?
  bool zero_cow(const Mapping& old, uint64_t from, uint64_t to) const;
  Task<Status> write_with_cow(const Plan& plan, uint64_t offset, std::span<const std::byte> data,
                              uint64_t head_start, uint64_t tail_end, bool cow_is_zero);
  // write_with_cow for encrypted images: head + data + tail are encrypted
  // in one bounce buffer (zero COW cannot be left to the file: zeros must
  // be stored encrypted).
  Task<Status> write_cow_encrypted(uint64_t host, uint64_t offset, std::span<const std::byte> data,
                                   uint64_t head_start, uint64_t tail_end);
  Task<Status> link_l2(const Plan& plan, uint64_t first_guest, uint64_t head_start, uint64_t tail_end);
  Task<Status> read_cow(uint64_t guest, std::span<std::byte> out) {
    if (out.empty()) return empty_read();
    return read_guest_(guest, out);
  }
  static Task<Status> empty_read() { co_return Status(); }

  Parts p_;
  Options o_;
  GuestReader read_guest_;
};

}  // namespace uqcow::qcow2
