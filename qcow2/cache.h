// MetadataCache: the L2-table and refcount-block cache, after QEMU's
// qcow2-cache.c.
//
// A cache holds `capacity` entries of `entry_size` bytes (an L2 slice or a
// refcount block), keyed by host offset. Memory is one region reserved at
// creation, so neither hits nor misses allocate. Entries are evicted in LRU
// order; entries that are pinned (ref > 0), dirty, or loading are skipped.
//
// Two ways in:
// - lookup(): the hot path. No lock, no allocation, no I/O: returns the bytes
//   of a cached entry or nullptr. The pointer is valid until the caller's
//   next suspension point (nothing can evict on this thread before then);
//   never hold it across a co_await.
// - get(): the slow path, called with the image's metadata lock held. Loads
//   the entry on a miss and returns a pinned reference (Ref) that stays valid
//   across suspension points until it is released.
//
// Writeback: mark_dirty() on a Ref; flush() writes every dirty entry in one
// batch (all writes submitted together), after first flushing the cache this
// one depends on (set_dependency), so that e.g. refcount blocks reach the disk
// before the L2 tables that point at the clusters they count.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "block/debug_event.h"
#include "engine/co_queue.h"
#include "engine/result.h"
#include "engine/task.h"
#include "uring/block_device.h"

namespace uqcow::qcow2 {

struct CacheStats {
  uint64_t hits = 0;
  uint64_t misses = 0;       // accesses that loaded the entry (or zero-filled a fresh one)
  uint64_t evictions = 0;
  uint64_t writebacks = 0;   // entries written to disk
  uint64_t cleaned = 0;      // entries dropped by clean_unused()
};

// Called before every metadata write with (offset, length); a non-OK status
// refuses the write (the overlap check hooks in here).
class MetadataWriteCheck {
 public:
  virtual ~MetadataWriteCheck() = default;
  virtual Status check_metadata_write(uint64_t offset, uint64_t length, const char* what) = 0;
};

class MetadataCache {
 public:
  class Ref;

  // `what` names the cache in errors and stats ("L2", "refcount").
  static Result<std::unique_ptr<MetadataCache>> create(std::string what, BlockDevice& file,
                                                       uint32_t entry_size, uint32_t capacity);
  ~MetadataCache();
  MetadataCache(const MetadataCache&) = delete;
  MetadataCache& operator=(const MetadataCache&) = delete;

  // Hot path (see above). Counts a hit; a miss is counted by the get() the
  // caller falls back to, so every access counts once (misses = loads).
  const uint8_t* lookup(uint64_t offset);

  // Slow path: returns the entry for `offset`, reading it from the file on a
  // miss; zero-filled instead of read when `fresh` (a newly allocated table:
  // zero-filled on a hit too, whatever a stale entry held).
  // Errors: the read's error, or EBUSY if every entry is pinned or loading.
  Task<Result<Ref>> get(uint64_t offset, bool fresh = false);

  void mark_dirty(Ref& ref);
  // Writes all dirty entries (dependency first). Does not fsync the file;
  // the image's flush does that after the last cache.
  Task<Status> flush();
  // Writes of this cache wait for `dep` to be flushed (and the file synced)
  // first. One dependency at a time, as in QEMU's qcow2_cache_set_dependency:
  // an existing, different dependency (or one of `dep`'s own) is flushed
  // first, which breaks cycles between the L2 and refcount caches.
  Task<Status> depend_on(MetadataCache& dep);
  // Flushes the cache this one depends on (and syncs), then forgets it.
  Task<Status> flush_dependency();
  // Requires a file sync before the next write of this cache (QEMU's
  // qcow2_cache_depends_on_flush): e.g. guest data an L2 entry now points
  // at must be durable before the entry is.
  void set_depends_on_flush() { depends_on_flush_ = true; }
  // A second device that such a sync covers too (an external data file).
  void set_also_sync(BlockDevice* device) { also_sync_ = device; }

  // Drops the entry for `offset` if cached and clean and unpinned (e.g. the
  // cluster was freed). A dirty entry is dropped without writeback.
  void discard(uint64_t offset);
  // discard() of every entry in [offset, offset + length).
  void discard_range(uint64_t offset, uint64_t length);
  // Drops clean, unpinned entries that have not been used since the previous
  // call (cache-clean-interval), returning their memory to the system.
  unsigned clean_unused();
  // Drops every clean, unpinned entry (after the image changed under us).
  void invalidate_clean();

  void set_write_check(MetadataWriteCheck* check) { write_check_ = check; }
  // Debug events announced on the file before a miss reads an entry and
  // before a writeback writes them (l2_load/l2_update, refblock_load/...).
  void set_debug_events(BlkDebugEvent load, BlkDebugEvent update) {
    load_event_ = load;
    update_event_ = update;
  }

  uint32_t entry_size() const { return entry_size_; }
  uint32_t capacity() const { return capacity_; }
  uint32_t size() const { return used_; }
  bool has_dirty() const { return dirty_count_ != 0; }
  const CacheStats& stats() const { return stats_; }
  const std::string& what() const { return what_; }
  // Offsets of the cached entries in LRU order, most recent first (tests).
  std::vector<uint64_t> lru_order() const;

 private:
  static constexpr uint32_t kNone = UINT32_MAX;
  static constexpr uint64_t kNoOffset = UINT64_MAX;

  struct Entry {
    uint64_t offset = kNoOffset;
    uint32_t ref = 0;
    bool dirty = false;
    bool loading = false;
    bool used = false;  // touched since the last clean_unused()
    uint32_t prev = kNone, next = kNone;  // LRU list, head = most recent
  };

  MetadataCache(std::string what, BlockDevice& file, uint32_t entry_size, uint32_t capacity);

  uint8_t* data(uint32_t i) { return base_ + size_t{i} * entry_size_; }
  uint32_t find(uint64_t offset) const;
  void hash_insert(uint64_t offset, uint32_t index);
  void hash_erase(uint64_t offset);
  size_t hash_slot(uint64_t offset) const;
  void lru_unlink(uint32_t i);
  void lru_push_front(uint32_t i);
  void touch(uint32_t i);
  uint32_t pick_victim() const;
  void drop(uint32_t i);
  Task<Status> write_entries(std::vector<uint32_t> indices);

  std::string what_;
  BlockDevice& file_;
  uint32_t entry_size_;
  uint32_t capacity_;
  uint32_t used_ = 0;
  uint32_t dirty_count_ = 0;
  uint8_t* base_ = nullptr;
  size_t mapped_bytes_ = 0;
  std::vector<Entry> entries_;
  std::vector<uint32_t> free_;        // unused entry indices
  std::vector<uint32_t> table_;       // open-addressing hash: entry index or kNone
  size_t table_mask_ = 0;
  uint32_t lru_head_ = kNone, lru_tail_ = kNone;
  MetadataCache* depends_on_ = nullptr;
  bool depends_on_flush_ = false;
  BlockDevice* also_sync_ = nullptr;
  MetadataWriteCheck* write_check_ = nullptr;
  BlkDebugEvent load_event_ = BlkDebugEvent::kL2Load;
  BlkDebugEvent update_event_ = BlkDebugEvent::kL2Update;
  CoQueue load_waiters_;              // coroutines waiting for a loading entry
  CacheStats stats_;

 public:
  // A pinned cache entry. Move-only; releasing it unpins the entry.
  class Ref {
   public:
    Ref() = default;
    Ref(MetadataCache* cache, uint32_t index) : cache_(cache), index_(index) {
      ++cache_->entries_[index_].ref;
    }
    Ref(Ref&& o) noexcept : cache_(o.cache_), index_(o.index_) { o.cache_ = nullptr; }
    Ref& operator=(Ref&& o) noexcept {
      if (this != &o) {
        reset();
        cache_ = o.cache_;
        index_ = o.index_;
        o.cache_ = nullptr;
      }
      return *this;
    }
    Ref(const Ref&) = delete;
    ~Ref() { reset(); }
    void reset() {
      if (cache_) --cache_->entries_[index_].ref;
      cache_ = nullptr;
    }
    uint8_t* data() const { return cache_->data(index_); }
    uint64_t offset() const { return cache_->entries_[index_].offset; }
    explicit operator bool() const { return cache_ != nullptr; }

   private:
    friend class MetadataCache;
    MetadataCache* cache_ = nullptr;
    uint32_t index_ = 0;
  };
};

}  // namespace uqcow::qcow2
