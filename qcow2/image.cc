#include "qcow2/header_io.h"
#include "qcow2/image.h"

#include <algorithm>
#include <cassert>
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "block/debug_event.h"
#include "block/endian.h"
#include "block/path.h"
#include "engine/sync_wait.h"
#include "qcow2/compress.h"
#include "qcow2/hex.h"
#include "qcow2/tables.h"

namespace uqcow::qcow2 {
namespace {

constexpr uint64_t kMinRefcountCacheEntries = 4;   // QEMU MIN_REFCOUNT_CACHE_SIZE
constexpr uint64_t kMinL2CacheEntries = 2;         // QEMU MIN_L2_CACHE_SIZE
constexpr uint64_t kDefaultL2CacheMax = 32ull << 20;
constexpr uint64_t kMaxCacheEntries = INT32_MAX;

std::span<std::byte> as_bytes(std::vector<uint8_t>& v) {
  return {reinterpret_cast<std::byte*>(v.data()), v.size()};
}

}  // namespace

Result<CacheSizes> compute_cache_sizes(const Header& h, const OpenOptions& o) {
  const Geometry g = h.geometry();
  CacheSizes c;
  uint64_t entry = o.l2_cache_entry_size.value_or(std::min<uint64_t>(g.cluster_size, 4096));
  if (entry < 512 || entry > g.cluster_size || (entry & (entry - 1)) != 0) {
    return Error(EINVAL, "l2-cache-entry-size: " + std::to_string(entry) +
                             " must be a power of two between 512 and the cluster size (" +
                             std::to_string(g.cluster_size) + ")");
  }
  c.l2_entry_size = static_cast<uint32_t>(entry);
  uint64_t max_l2_entries = g.size_to_clusters(h.size);
  uint64_t max_l2_cache = (max_l2_entries * g.l2_entry_size + g.cluster_size - 1) /
                          g.cluster_size * g.cluster_size;
  c.l2_cache_bytes = o.l2_cache_size.value_or(std::min(kDefaultL2CacheMax, max_l2_cache));
  c.refcount_cache_bytes = o.refcount_cache_size.value_or(kMinRefcountCacheEntries * g.cluster_size);
  if (c.l2_cache_bytes / entry > kMaxCacheEntries) {
    return Error(EINVAL, "l2-cache-size: " + std::to_string(c.l2_cache_bytes) + " is too big");
  }
  if (c.refcount_cache_bytes / g.cluster_size > kMaxCacheEntries) {
    return Error(EINVAL, "refcount-cache-size: " + std::to_string(c.refcount_cache_bytes) +
                             " is too big");
  }
  return c;
}

Qcow2Image::Qcow2Image(std::unique_ptr<BlockDevice> file, OpenOptions options)
    : file_(std::move(file)),
      options_(std::move(options)),
      reporter_(file_->name(), options_.read_only, [this] { mark_corrupt_on_disk(); }) {}

Qcow2Image::~Qcow2Image() {
  // An image dropped without close() still has its background tasks (the
  // cache-clean timer) in flight on the ring; their frames must not go away
  // under the kernel. Close synchronously on this thread's reactor. (Only
  // for plain code that forgot close(): coroutines always co_await close().)
  if (!closed_ && uring::Reactor::has_current()) {
    (void)sync_wait(uring::Reactor::current(), close());
  }
}

void Qcow2Image::mark_corrupt_on_disk() {
  // The bit goes through the metadata lock, which the caller may hold: it
  // lands after any header update in progress (the lazy-refcounts dirty
  // bit), which would otherwise overwrite it. close() joins the task.
  background_.spawn([](Qcow2Image* self) -> Task<void> {
    auto guard = co_await self->lock_.scoped_lock();
    (void)co_await self->write_header_incompatible(self->header_.incompatible_features | kIncompatCorrupt);
    (void)co_await self->file_->co_flush();
  }(this));
}

const std::string& Qcow2Image::data_file_name() const { return data_file_path_; }

Task<Result<std::unique_ptr<Qcow2Image>>> Qcow2Image::open(std::unique_ptr<BlockDevice> file,
                                                           OpenOptions options,
                                                           BackingOpener open_backing) {
  if (!options.snapshot.empty()) options.read_only = true;
  std::unique_ptr<Qcow2Image> img(new Qcow2Image(std::move(file), std::move(options)));
  Status s = co_await img->load(open_backing);
  if (!s.ok()) {
    // Close here, on the reactor, so the destructor has nothing left to do
    // (it must not drive the reactor from inside this coroutine).
    (void)co_await img->close();
    co_return Error(s.code(), s.message());
  }
  co_return std::move(img);
}

Task<Status> Qcow2Image::load(BackingOpener& open_backing) {
  UQ_CO_ASSIGN_OR_RETURN(uint64_t file_len, file_->length());
  UQ_CO_ASSIGN_OR_RETURN(header_, co_await read_image_header(*file_, HeaderUse::kOpen));
  geo_ = header_.geometry();
  inflight_.emplace(geo_.cluster_size);
  // QEMU counts the disk in whole sectors (bs->total_sectors): a header size
  // that is not a multiple of 512 loses its partial last sector, as there.
  size_ = header_.size & ~uint64_t{kSectorSize - 1};
  v3_ = header_.version >= 3;

  if (!options_.read_only && header_.corrupt()) {
    co_return Error(EACCES, file_->name() + ": the image is marked corrupt; open it read-only, "
                                            "or repair it with 'uqcow check -r all'");
  }

  if (Status placed = validate_table_placement(header_, file_len, !options_.read_only); !placed.ok()) {
    co_return placed.error().with_context(file_->name());
  }

  UQ_CO_TRY(co_await open_encryption());

  // External data file.
  data_file_ = file_.get();
  if (header_.has_data_file()) {
    data_file_path_ = resolve_relative(file_->name(), *header_.data_file);
    // Opened and locked in the image's own mode, as QEMU opens its
    // data-file child: guest data of a read-write image is written there.
    RawFileOptions fo{.read_only = options_.read_only,
                      .cache = options_.cache,
                      .lock = lock_perms(options_, LockedFile::kDataFile)};
    auto df = RawFile::open(data_file_path_, fo);
    if (!df.ok()) co_return std::move(df).error().with_context("external data file");
    data_file_storage_ = std::move(df).value();
    data_file_ = data_file_storage_.get();
  }

  overlap_.emplace(reporter_, geo_.cluster_size, data_file_ == file_.get());
  UQ_CO_TRY(create_components());
  UQ_CO_TRY(co_await map_->load_l1(header_.l1_table_offset, header_.l1_size));
  UQ_CO_TRY(co_await snapshots_->load());
  UQ_CO_TRY(co_await bitmaps_->load(size_));
  if (!options_.snapshot.empty()) UQ_CO_TRY(co_await select_snapshot(options_.snapshot));

  // Backing file.
  if (!header_.backing_file.empty() && !options_.no_backing) {
    backing_path_ = resolve_relative(file_->name(), header_.backing_file);
    std::string fmt = header_.backing_format.value_or("");
    if (!fmt.empty() && fmt != "qcow2" && fmt != "raw") {
      co_return Error(ENOTSUP, file_->name() + ": backing file format '" + fmt +
                                   "' is not supported (qcow2 and raw are)");
    }
    auto b = co_await open_backing(backing_path_, fmt);
    if (!b.ok()) co_return std::move(b).error().with_context("backing file of " + file_->name());
    backing_ = std::move(b).value();
  }

  if (!options_.read_only) UQ_CO_TRY(co_await prepare_read_write());
  if (options_.cache_clean_interval > 0) background_.spawn(clean_timer());
  co_return Status();
}

Status Qcow2Image::create_components() {
  UQ_ASSIGN_OR_RETURN(cache_sizes_, compute_cache_sizes(header_, options_));
  uint64_t l2_entries = std::max(kMinL2CacheEntries, cache_sizes_.l2_cache_bytes / cache_sizes_.l2_entry_size);
  uint64_t rc_entries = std::max(kMinRefcountCacheEntries, cache_sizes_.refcount_cache_bytes / geo_.cluster_size);
  UQ_ASSIGN_OR_RETURN(std::unique_ptr<MetadataCache> l2,
                      MetadataCache::create("L2", *file_, cache_sizes_.l2_entry_size, static_cast<uint32_t>(l2_entries)));
  l2->set_debug_events(BlkDebugEvent::kL2Load, BlkDebugEvent::kL2Update);
  if (data_file_ != file_.get()) l2->set_also_sync(data_file_);
  UQ_ASSIGN_OR_RETURN(std::unique_ptr<MetadataCache> rc,
                      MetadataCache::create("refcount", *file_, static_cast<uint32_t>(geo_.cluster_size),
                                            static_cast<uint32_t>(rc_entries)));
  rc->set_debug_events(BlkDebugEvent::kRefblockLoad, BlkDebugEvent::kRefblockUpdate);
  map_.emplace(*file_, header_, geo_, std::move(l2), cache_sizes_.l2_entry_size, *overlap_);
  refcounts_.emplace(*file_, header_, geo_, std::move(rc), map_->l2_cache(), *overlap_, reporter_);
  snapshots_.emplace(*file_, header_, geo_, *map_, *refcounts_, *overlap_);
  snapshot_refs_.emplace(geo_, *file_, data_file_ != file_.get(), *map_, *refcounts_, reporter_);
  l1_resize_.emplace(*file_, header_, geo_, *map_, *refcounts_, *overlap_, reporter_);
  freed_.emplace(geo_, *file_, *data_file_, requests_, *refcounts_, map_->l2_cache(), reporter_);
  bitmaps_.emplace(*file_, header_, geo_, options_.read_only ? nullptr : &*refcounts_, *overlap_);
  return Status();
}

Task<Status> Qcow2Image::prepare_read_write() {
  lazy_refcounts_ = options_.lazy_refcounts.value_or(header_.lazy_refcounts());
  if (lazy_refcounts_ && header_.version < 3) {
    co_return Error(EINVAL, "lazy-refcounts: lazy refcounts need a compat=1.1 (v3) image");
  }
  if (header_.dirty()) {
    // Left dirty by a crash with lazy refcounts: the refcounts on disk may be
    // too low. They are rebuilt before anything is loaded or allocated.
    UQ_CO_TRY(co_await repair_after_crash());
  }
  UQ_CO_TRY(co_await refcounts_->load_refcount_table());
  writer_.emplace(MappingWriter::Parts{.file = *file_,
                                       .data_file = *data_file_,
                                       .header = header_,
                                       .geo = geo_,
                                       .map = *map_,
                                       .refcounts = *refcounts_,
                                       .inflight = *inflight_,
                                       .freed = *freed_,
                                       .overlap = *overlap_,
                                       .reporter = reporter_,
                                       .lock = lock_},
                  MappingWriter::Options{.lazy_refcounts = lazy_refcounts_,
                                         .backing_size = backing_ ? std::optional<uint64_t>(backing_->size())
                                                                  : std::nullopt,
                                         .crypto = crypto_.get()},
                  [this](uint64_t guest, std::span<std::byte> out) { return read_cow(guest, out); });
  UQ_CO_TRY(co_await build_metadata_regions());
  map_->l2_cache().set_write_check(&overlap_->l2_cache_check());
  refcounts_->cache().set_write_check(&overlap_->refcount_cache_check());
  UQ_CO_TRY(co_await prepare_bitmaps());
  co_return Status();
}


Task<Status> Qcow2Image::select_snapshot(const std::string& key) {
  const Snapshot* found = snapshots_->find(key);
  if (!found) co_return Error(ENOENT, file_->name() + ": no snapshot with id or name '" + key + "'");
  // Like qemu-img convert -l, the disk keeps the image's current size: what
  // the snapshot's (maybe smaller) L1 table does not map reads as
  // unallocated.
  co_return co_await map_->load_l1(found->l1_table_offset, found->l1_size);
}

// ---------------------------------------------------------------------------
// Mapping: guest offset -> (subcluster type, host offset, run length).

Task<Result<Mapping>> Qcow2Image::map_slow(uint64_t offset, uint64_t max_bytes) {
  auto guard = co_await lock_.scoped_lock();
  // Re-read the L1 entry under the lock: it may have changed while waiting.
  auto l2 = map_->l2_table_of(offset);
  if (!l2.ok()) co_return fatal_corruption(std::move(l2).error());
  if (*l2 == 0) {
    Result<Mapping> m = Mapping{};
    map_->map_fast(offset, max_bytes, m);
    co_return m;
  }
  uint64_t slice = map_->slice_offset(*l2, offset);
  UQ_CO_ASSIGN_OR_RETURN(auto ref, co_await map_->l2_cache().get(slice));
  auto m = map_->decode_l2(ref.data(), slice, offset, max_bytes);
  if (!m.ok()) co_return fatal_corruption(std::move(m).error());
  co_return m;
}

Task<Result<Mapping>> Qcow2Image::map_range(uint64_t offset, uint64_t max_bytes) {
  // A damaged entry takes the slow path, which marks the image corrupt.
  Result<Mapping> m = Mapping{};
  if (map_->map_fast(offset, max_bytes, m) && m.ok()) co_return m;
  co_return co_await map_slow(offset, max_bytes);
}

// ---------------------------------------------------------------------------
// Reads.

Task<Status> Qcow2Image::read_range(uint64_t offset, std::span<std::byte> buf, Entry entry) {
  // A new request holds a ticket until the data has arrived: a host cluster
  // it maps cannot be reused by another guest offset until then
  // (FreedClusters::defer). (No separate wrapper coroutine: that cost a
  // frame and ~300 instructions per request.)
  std::optional<InFlightTracker::Ticket> ticket;
  if (entry == Entry::kNewRequest) {
    if (!requests_.admitting()) [[unlikely]] co_await requests_.wait_admitted();
    ticket.emplace(requests_);
  }
  if (closed_) co_return Error(EBADF, file_->name() + " is closed");
  if (offset > size_ || buf.size() > size_ - offset) {
    co_return Error(EINVAL, "read of " + std::to_string(buf.size()) + " bytes at " +
                                std::to_string(offset) + " is beyond the end of the disk (" +
                                std::to_string(size_) + " bytes)");
  }
  if (encrypted() && ((offset | buf.size()) & (crypto::kSectorSize - 1))) {
    co_return co_await read_unaligned(offset, buf);
  }
  while (!buf.empty()) {
    Result<Mapping> m = Mapping{};
    // A damaged entry takes the slow path too, which marks the image corrupt.
    if (!map_->map_fast(offset, buf.size(), m) || !m.ok()) m = co_await map_slow(offset, buf.size());
    if (!m.ok()) co_return std::move(m).error();
    size_t n = static_cast<size_t>(std::min<uint64_t>(m->bytes, buf.size()));
    assert(n > 0 && "a mapping always covers at least one byte");
    if (m->type == SubclusterType::kNormal && header_.crypt_method == CryptMethod::kNone) {
      // The hot path: straight from the mapping to the data file's read.
      data_file_->debug_event(BlkDebugEvent::kReadAio);
      UQ_CO_TRY(co_await data_file_->co_read(m->host_offset, buf.first(n)));
    } else {
      UQ_CO_TRY(co_await read_mapped(*m, offset, buf.first(n)));
    }
    offset += n;
    buf = buf.subspan(n);
  }
  co_return Status();
}

Task<Status> Qcow2Image::read_mapped(const Mapping& m, uint64_t offset, std::span<std::byte> buf) {
  switch (m.type) {
    case SubclusterType::kZeroPlain:
    case SubclusterType::kZeroAlloc:
      std::memset(buf.data(), 0, buf.size());
      co_return Status();
    case SubclusterType::kUnallocatedPlain:
    case SubclusterType::kUnallocatedAlloc:
      co_return co_await read_backing(offset, buf);
    case SubclusterType::kCompressed:
      co_return co_await read_compressed(m.host_offset, offset, buf);
    case SubclusterType::kNormal:
      if (encrypted()) co_return co_await read_encrypted(offset, m.host_offset, buf);
      data_file_->debug_event(BlkDebugEvent::kReadAio);
      co_return co_await data_file_->co_read(m.host_offset, buf);
    case SubclusterType::kInvalid:
      break;
  }
  co_return corruption("invalid mapping");
}

Task<Status> Qcow2Image::read_backing(uint64_t offset, std::span<std::byte> buf) {
  uint64_t backing_size = backing_ ? backing_->size() : 0;
  size_t from_backing = offset < backing_size
                            ? static_cast<size_t>(std::min<uint64_t>(buf.size(), backing_size - offset))
                            : 0;
  if (from_backing > 0) {
    file_->debug_event(BlkDebugEvent::kReadBackingAio);
    UQ_CO_TRY(co_await backing_->read(offset, buf.first(from_backing)));
  }
  // Past the end of a shorter backing file (or with none) the disk reads zeros.
  std::memset(buf.data() + from_backing, 0, buf.size() - from_backing);
  co_return Status();
}

Task<Status> Qcow2Image::read_compressed(uint64_t l2e, uint64_t offset, std::span<std::byte> buf) {
  uint64_t coffset = geo_.compressed_offset(l2e);
  uint64_t csize = geo_.compressed_size(l2e);  // at most 2 clusters, by the field width
  if (coffset + csize > (1ull << 56)) {
    co_return corruption("compressed cluster at " + hex(coffset) + " lies beyond the maximum offset");
  }
  std::vector<uint8_t> in(csize);
  std::vector<uint8_t> out(geo_.cluster_size);
  file_->debug_event(BlkDebugEvent::kReadCompressed);
  UQ_CO_TRY(co_await file_->co_read(coffset, as_bytes(in)));
  Status s = decompress_cluster(header_.compression_type, in, out);
  if (!s.ok()) co_return corruption("compressed cluster at " + hex(coffset) + ": " + s.message());
  std::memcpy(buf.data(), out.data() + geo_.offset_into_cluster(offset), buf.size());
  co_return Status();
}

Task<Result<BlockStatus>> Qcow2Image::block_status(uint64_t offset, uint64_t max_len) {
  if (offset >= size_) co_return Error(EINVAL, "block status beyond the end of the disk");
  max_len = std::min(max_len, size_ - offset);
  UQ_CO_ASSIGN_OR_RETURN(Mapping m, co_await map_range(offset, max_len));
  BlockStatus st;
  st.length = m.bytes;
  switch (m.type) {
    case SubclusterType::kNormal:
      st.kind = BlockStatus::Kind::kData;
      st.has_offset = header_.crypt_method == CryptMethod::kNone;  // ciphertext has no guest offset
      st.host_offset = m.host_offset;
      st.file = &data_file_->name();
      break;
    case SubclusterType::kCompressed:
      st.kind = BlockStatus::Kind::kData;
      st.compressed = true;
      break;
    case SubclusterType::kZeroAlloc:
      st.kind = BlockStatus::Kind::kZero;
      st.has_offset = header_.crypt_method == CryptMethod::kNone;
      st.host_offset = m.host_offset;
      st.file = &data_file_->name();
      break;
    case SubclusterType::kZeroPlain:
      st.kind = BlockStatus::Kind::kZero;
      break;
    case SubclusterType::kUnallocatedAlloc:
      // Reserved host cluster, content from the backing file: QEMU reports
      // the offset without the data flag.
      st.kind = BlockStatus::Kind::kUnallocated;
      st.has_offset = header_.crypt_method == CryptMethod::kNone;
      st.host_offset = m.host_offset;
      st.file = &data_file_->name();
      break;
    default:
      st.kind = BlockStatus::Kind::kUnallocated;
      break;
  }
  co_return st;
}

Task<Status> Qcow2Image::flush() {
  // (No caches yet: an open that failed part-way is being closed.)
  if (options_.read_only || closed_ || !map_ || !refcounts_) co_return Status();
  auto guard = co_await lock_.scoped_lock();
  // The bitmaps first (bitmap-store-interval): their store syncs what it
  // wrote itself, and the frees it leaves reach the disk below.
  if (bitmaps_ && !reporter_.marked_corrupt()) {
    UQ_CO_TRY(co_await bitmaps_->store_on_flush(options_.bitmap_store_interval));
  }
  // Dependency order is recorded in the caches: flushing L2 first writes the
  // refcount blocks it depends on (and syncs) before the L2 tables.
  file_->debug_event(BlkDebugEvent::kFlushToOs);
  UQ_CO_TRY(co_await map_->l2_cache().flush());
  UQ_CO_TRY(co_await refcounts_->cache().flush());
  file_->debug_event(BlkDebugEvent::kFlushToDisk);
  UQ_CO_TRY(co_await file_->co_flush());
  if (data_file_ != file_.get()) UQ_CO_TRY(co_await data_file_->co_flush());
  // Every unlink so far is on disk: the deferred frees past their grace
  // period go now, and their lowered refcounts reach the disk too.
  freed_->unlinks_are_durable();
  const size_t deferred = freed_->size();
  UQ_CO_TRY(co_await freed_->release());
  if (freed_->size() != deferred) {
    UQ_CO_TRY(co_await refcounts_->cache().flush());
    UQ_CO_TRY(co_await map_->l2_cache().flush());
    UQ_CO_TRY(co_await file_->co_flush());
  }
  co_return Status();
}

// ---------------------------------------------------------------------------
// Lifetime.

Task<void> Qcow2Image::clean_timer() {
  const uint64_t ns = options_.cache_clean_interval * 1000000000ull;
  while (!closing_) {
    uring::TimeoutOp sleep(ns);
    clean_sleep_ = &sleep;
    int r = co_await sleep;
    clean_sleep_ = nullptr;
    if (closing_ || r == -ECANCELED) break;
    map_->l2_cache().clean_unused();
    refcounts_->cache().clean_unused();
  }
}

Task<Status> Qcow2Image::close() {
  if (closed_) co_return Status();
  auto exclusive = co_await exclusive_.scoped_lock();  // see image.h
  if (closed_) co_return Status();
  // Requests still in flight finish first, and none starts after; the
  // flush below then releases every deferred free.
  co_await requests_.drain();  // a drained section that never ends
  closing_ = true;
  if (clean_sleep_) (void)co_await uring::TimeoutRemoveOp(clean_sleep_);
  co_await background_.join();
  Status status;
  if (!options_.read_only && bitmaps_ && !reporter_.marked_corrupt()) {
    // The bitmaps go back with IN_USE cleared (a marked-corrupt image keeps
    // them in use: inconsistent, as QEMU leaves them).
    auto guard = co_await lock_.scoped_lock();
    status = co_await bitmaps_->store(/*clear_in_use=*/true);
  }
  if (Status f = co_await flush(); status.ok()) status = f;
  if (status.ok() && marked_dirty_ && !reporter_.marked_corrupt()) {
    // Everything is on disk: the refcounts are consistent again.
    status = co_await write_header_incompatible(header_.incompatible_features & ~kIncompatDirty);
    if (status.ok()) status = co_await file_->co_flush();
    marked_dirty_ = false;
  }
  // The flush above may have failed an overlap check, which spawns the
  // write of the corrupt bit: wait for that too before the group goes.
  co_await background_.join();
  if (backing_) {
    Status b = co_await backing_->close();
    if (status.ok() && !b.ok()) status = b;
  }
  writer_.reset();  // it holds crypto_ (and no request is in flight now)
  crypto_.reset();  // wipes the key schedules
  file_->release_locks();
  if (data_file_storage_) data_file_storage_->release_locks();
  closed_ = true;
  co_return status;
}

Result<uint64_t> Qcow2Image::allocated_bytes() const {
  // Like qemu-img 7.2: the qcow2 file only, not an external data file.
  return file_->allocated_bytes();
}

}  // namespace uqcow::qcow2
