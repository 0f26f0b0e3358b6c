#include "qcow2/cache.h"

#include <sys/mman.h>

#include <cstring>

#include "engine/when_all.h"

namespace uqcow::qcow2 {

Result<std::unique_ptr<MetadataCache>> MetadataCache::create(std::string what, BlockDevice& file,
                                                             uint32_t entry_size,
                                                             uint32_t capacity) {
  if (entry_size < 512 || (entry_size & (entry_size - 1)) != 0) {
    return Error(EINVAL, what + " cache: entry size " + std::to_string(entry_size) +
                             " must be a power of two >= 512");
  }
  if (capacity == 0) return Error(EINVAL, what + " cache: no entries");
  std::unique_ptr<MetadataCache> c(new MetadataCache(std::move(what), file, entry_size, capacity));
  // Reserve address space only: pages become resident when an entry is first
  // filled and are returned by clean_unused().
  size_t bytes = size_t{entry_size} * capacity;
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return errno_error(errno, c->what_ + " cache: reserving " + std::to_string(bytes) + " bytes");
  c->base_ = static_cast<uint8_t*>(p);
  c->mapped_bytes_ = bytes;
  return c;
}

MetadataCache::MetadataCache(std::string what, BlockDevice& file, uint32_t entry_size,
                             uint32_t capacity)
    : what_(std::move(what)), file_(file), entry_size_(entry_size), capacity_(capacity),
      entries_(capacity) {
  free_.reserve(capacity);
  for (uint32_t i = capacity; i > 0; --i) free_.push_back(i - 1);
  size_t slots = 2;
  while (slots < size_t{capacity} * 2) slots <<= 1;
  table_.assign(slots, kNone);
  table_mask_ = slots - 1;
}

MetadataCache::~MetadataCache() {
  if (base_) munmap(base_, mapped_bytes_);
}

size_t MetadataCache::hash_slot(uint64_t offset) const {
  uint64_t k = (offset >> 9) * 0x9e3779b97f4a7c15ull;
  return static_cast<size_t>(k >> 32) & table_mask_;
}

uint32_t MetadataCache::find(uint64_t offset) const {
  for (size_t s = hash_slot(offset);; s = (s + 1) & table_mask_) {
    uint32_t i = table_[s];
    if (i == kNone) return kNone;
    if (entries_[i].offset == offset) return i;
  }
}

void MetadataCache::hash_insert(uint64_t offset, uint32_t index) {
  size_t s = hash_slot(offset);
  while (table_[s] != kNone) s = (s + 1) & table_mask_;
  table_[s] = index;
}

// Linear-probing deletion by backward shift: keeps every remaining key
// reachable from its home slot without tombstones.
void MetadataCache::hash_erase(uint64_t offset) {
  size_t s = hash_slot(offset);
  while (entries_[table_[s]].offset != offset) s = (s + 1) & table_mask_;
  size_t hole = s;
  for (size_t j = (hole + 1) & table_mask_; table_[j] != kNone; j = (j + 1) & table_mask_) {
    size_t home = hash_slot(entries_[table_[j]].offset);
    // Move j into the hole if its home is not in the cyclic range (hole, j].
    bool home_in_range = hole < j ? (home > hole && home <= j) : (home > hole || home <= j);
    if (!home_in_range) {
      table_[hole] = table_[j];
      hole = j;
    }
  }
  table_[hole] = kNone;
}

void MetadataCache::lru_unlink(uint32_t i) {
  Entry& e = entries_[i];
  if (e.prev != kNone) entries_[e.prev].next = e.next; else lru_head_ = e.next;
  if (e.next != kNone) entries_[e.next].prev = e.prev; else lru_tail_ = e.prev;
  e.prev = e.next = kNone;
}

void MetadataCache::lru_push_front(uint32_t i) {
  Entry& e = entries_[i];
  e.prev = kNone;
  e.next = lru_head_;
  if (lru_head_ != kNone) entries_[lru_head_].prev = i; else lru_tail_ = i;
  lru_head_ = i;
}

void MetadataCache::touch(uint32_t i) {
  entries_[i].used = true;
  if (lru_head_ != i) {
    lru_unlink(i);
    lru_push_front(i);
  }
}

const uint8_t* MetadataCache::lookup(uint64_t offset) {
  uint32_t i = find(offset);
  // A miss here is not counted: the caller's get() that follows counts the
  // access once, as a hit (someone loaded it meanwhile) or as a miss.
  if (i == kNone || entries_[i].loading) return nullptr;
  ++stats_.hits;
  touch(i);
  return data(i);
}

uint32_t MetadataCache::pick_victim() const {
  for (uint32_t i = lru_tail_; i != kNone; i = entries_[i].prev) {
    const Entry& e = entries_[i];
    if (e.ref == 0 && !e.loading && !e.dirty) return i;
  }
  return kNone;
}

void MetadataCache::drop(uint32_t i) {
  Entry& e = entries_[i];
  hash_erase(e.offset);
  lru_unlink(i);
  if (e.dirty) --dirty_count_;
  e = Entry{};
  free_.push_back(i);
  --used_;
}

Task<Result<MetadataCache::Ref>> MetadataCache::get(uint64_t offset, bool fresh) {
  while (true) {
    uint32_t i = find(offset);
    if (i == kNone) break;
    if (!entries_[i].loading) {
      ++stats_.hits;
      touch(i);
      if (fresh) std::memset(data(i), 0, entry_size_);
      co_return Ref(this, i);
    }
    co_await load_waiters_.wait();  // re-check: the load may have failed
  }
  ++stats_.misses;
  if (free_.empty()) {
    uint32_t victim = pick_victim();
    if (victim == kNone && dirty_count_ > 0) {
      // Everything evictable is dirty: write back, then pick again.
      UQ_CO_TRY(co_await flush());
      victim = pick_victim();
    }
    if (victim == kNone) {
      co_return Error(EBUSY, what_ + " cache: all " + std::to_string(capacity_) +
                                 " entries are in use");
    }
    drop(victim);
    ++stats_.evictions;
    // Another coroutine may have inserted `offset` while we flushed.
    if (uint32_t again = find(offset); again != kNone) {
      co_return co_await get(offset, fresh);
    }
  }
  uint32_t i = free_.back();
  free_.pop_back();
  ++used_;
  Entry& e = entries_[i];
  e.offset = offset;
  e.used = true;
  hash_insert(offset, i);
  lru_push_front(i);
  if (fresh) {
    std::memset(data(i), 0, entry_size_);
    co_return Ref(this, i);
  }
  e.loading = true;
  Ref ref(this, i);  // pinned while loading
  file_.debug_event(load_event_);
  Status s = co_await file_.co_read(offset, std::span<std::byte>(reinterpret_cast<std::byte*>(data(i)), entry_size_));
  entries_[i].loading = false;
  load_waiters_.wake_all();
  if (!s.ok()) {
    ref.reset();
    drop(i);
    co_return Error(s.code(), what_ + " cache: " + s.message());
  }
  co_return ref;
}

void MetadataCache::mark_dirty(Ref& ref) {
  Entry& e = entries_[ref.index_];
  if (!e.dirty) {
    e.dirty = true;
    ++dirty_count_;
  }
}

Task<Status> MetadataCache::depend_on(MetadataCache& dep) {
  if (dep.depends_on_) UQ_CO_TRY(co_await dep.flush_dependency());
  if (depends_on_ && depends_on_ != &dep) UQ_CO_TRY(co_await flush_dependency());
  depends_on_ = &dep;
  co_return Status();
}

Task<Status> MetadataCache::flush_dependency() {
  if (depends_on_) {
    MetadataCache* dep = depends_on_;
    UQ_CO_TRY(co_await dep->flush());
    depends_on_flush_ = true;  // the dependency's writes must be durable first
    depends_on_ = nullptr;
  }
  if (depends_on_flush_) {
    UQ_CO_TRY(co_await file_.co_flush());
    if (also_sync_) UQ_CO_TRY(co_await also_sync_->co_flush());
    depends_on_flush_ = false;
  }
  co_return Status();
}

Task<Status> MetadataCache::write_entries(std::vector<uint32_t> indices) {
  // All writes are issued before any is awaited: one submission for the batch.
  std::vector<Task<Status>> writes;
  writes.reserve(indices.size());
  for (uint32_t i : indices) {
    writes.push_back(file_.co_write(entries_[i].offset, std::span<const std::byte>(
                                                            reinterpret_cast<std::byte*>(data(i)), entry_size_)));
  }
  std::vector<Status> results = co_await when_all(std::move(writes));
  Status first;
  for (size_t k = 0; k < results.size(); ++k) {
    uint32_t i = indices[k];
    --entries_[i].ref;
    if (results[k].ok()) {
      if (entries_[i].dirty) {
        entries_[i].dirty = false;
        --dirty_count_;
      }
      ++stats_.writebacks;
    } else if (first.ok()) {
      first = Error(results[k].code(), what_ + " cache writeback: " + results[k].message());
    }
  }
  co_return first;
}

Task<Status> MetadataCache::flush() {
  if (dirty_count_ == 0) co_return Status();
  UQ_CO_TRY(co_await flush_dependency());
  std::vector<uint32_t> batch;
  for (uint32_t i = 0; i < capacity_; ++i) {
    Entry& e = entries_[i];
    if (!e.dirty) continue;
    if (write_check_) {
      UQ_CO_TRY(write_check_->check_metadata_write(e.offset, entry_size_, what_.c_str()));
    }
    batch.push_back(i);
  }
  for (uint32_t i : batch) ++entries_[i].ref;  // pinned while the write is in flight
  file_.debug_event(update_event_);
  co_return co_await write_entries(std::move(batch));
}

void MetadataCache::discard(uint64_t offset) {
  uint32_t i = find(offset);
  if (i == kNone || entries_[i].ref != 0 || entries_[i].loading) return;
  drop(i);
}

void MetadataCache::discard_range(uint64_t offset, uint64_t length) {
  for (uint64_t off = offset; off < offset + length; off += entry_size_) discard(off);
}

unsigned MetadataCache::clean_unused() {
  unsigned n = 0;
  for (uint32_t i = 0; i < capacity_; ++i) {
    Entry& e = entries_[i];
    if (e.offset == kNoOffset) continue;
    if (!e.used && e.ref == 0 && !e.dirty && !e.loading) {
      drop(i);
      // Only whole pages can be handed back without touching neighbours.
      if (entry_size_ >= 4096) madvise(data(i), entry_size_, MADV_DONTNEED);
      ++n;
    } else {
      e.used = false;
    }
  }
  stats_.cleaned += n;
  return n;
}

void MetadataCache::invalidate_clean() {
  for (uint32_t i = 0; i < capacity_; ++i) {
    Entry& e = entries_[i];
    if (e.offset != kNoOffset && e.ref == 0 && !e.dirty && !e.loading) drop(i);
  }
}

std::vector<uint64_t> MetadataCache::lru_order() const {
  std::vector<uint64_t> out;
  for (uint32_t i = lru_head_; i != kNone; i = entries_[i].next) out.push_back(entries_[i].offset);
  return out;
}

}  // namespace uqcow::qcow2
