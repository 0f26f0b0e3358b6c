// MappingWriter: every change of the guest -> host mapping by a request,
// QEMU's qcow2-cluster.c write half: allocating writes (handle_copied,
// handle_alloc, the QCowL2Meta COW regions, qcow2_alloc_cluster_link_l2),
// l2_allocate, zeroing and discarding clusters (zero_in_l2_slice,
// discard_in_l2_slice), linking compressed clusters
// (qcow2_alloc_compressed_cluster_offset) and preallocation.
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
#include <utility>
#include <vector>

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
#include "qcow2/tables.h"
#include "uring/block_device.h"

namespace uqcow::qcow2 {

class MappingWriter {
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
  MappingWriter(Parts parts, Options options, GuestReader read_guest)
      : p_(parts), o_(options), read_guest_(std::move(read_guest)) {}
  MappingWriter(const MappingWriter&) = delete;
  MappingWriter& operator=(const MappingWriter&) = delete;

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

  // What zero_clusters() makes of each whole cluster (QEMU's
  // zero_in_l2_slice and discard_in_l2_slice).
  enum class ZeroMode {
    kZero,          // zero flag, the host cluster kept (write -z)
    kZeroMayUnmap,  // zero flag, the host cluster freed (write -z -u)
    kDiscard,       // freed; reads as zeros (zero flag where needed)
    kFullDiscard,   // freed and unallocated, whatever a backing file holds
                    // (the clusters a shrink crops)
  };
  // Makes guest [offset, offset + len) read as zeros (or unallocated) by
  // changing L2 entries alone: whole clusters per `mode`, and with extended
  // L2 the subclusters of a partial cluster. `offset` and `len` are
  // subcluster aligned, except that the range may end at `disk_size`, the
  // disk's partial last cluster. Host clusters no longer referenced go to
  // FreedClusters (discarded in the file too if `pass_discard`). Parts of
  // compressed clusters, which only writing zeros can change, are appended
  // to `by_writing` for the caller to write after releasing the lock. Lock
  // held, for the whole call; no allocation in flight overlaps the range
  // (AllocationsInFlight::wait_for_overlapping).
  Task<Status> zero_clusters(uint64_t offset, uint64_t len, ZeroMode mode, uint64_t disk_size, bool pass_discard,
                             std::vector<std::pair<uint64_t, uint64_t>>& by_writing);

  // Writes one cluster's compressed `data` (QEMU's
  // qcow2_co_pwritev_compressed_task): allocates its bytes, registers the
  // cluster in flight, writes with the lock released, and links the entry.
  // EIO if the cluster is allocated (compression only fills unallocated
  // clusters, as in QEMU). Called like write_step; returns with the lock
  // held.
  Task<Status> write_compressed_step(uint64_t offset, std::span<const uint8_t> data, CoMutex::Guard& guard);

  // Preallocation (qemu-img create -o preallocation=..., and the area a
  // resize adds under a raw data file): links every cluster of guest
  // [start, end) that has no host cluster to a fresh one (its own guest
  // offset with an external data file), in runs of one allocation per L2
  // slice, as "reserved" entries (OFLAG_COPIED, extended-L2 bitmap 0: they
  // read as zeros). Appends the host ranges linked to `runs`, merging
  // adjacent ones. `fresh`: the range must be unallocated (EEXIST
  // otherwise); else clusters that have a host cluster keep it. Lock held.
  struct HostRun {
    uint64_t host = 0, length = 0;
  };
  Task<Status> preallocate(uint64_t start, uint64_t end, bool fresh, std::vector<HostRun>& runs);

  // Host offset for n new data clusters starting at guest cluster `guest`:
  // fresh clusters of the qcow2 file, or, with an external data file, the
  // guest offset itself (nothing is allocated). Lock held.
  Task<Result<uint64_t>> alloc_data_clusters(uint64_t guest, uint64_t n);

 private:
  struct Plan;
  // The entry of guest `offset` in a writable L2 table (writable_l2_table):
  // its slice, pinned in the cache, and its index there. Lock held.
  struct EntryRef {
    MetadataCache::Ref ref;
    uint64_t index;
    L2Slice slice(const Geometry& geo) { return L2Slice(ref.data(), geo); }
  };
  Task<Result<EntryRef>> writable_entry(uint64_t offset);
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
