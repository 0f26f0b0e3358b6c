#include "qcow2/bitmaps.h"

#include <algorithm>
#include <chrono>

#include "block/endian.h"
#include "qcow2/header_io.h"
#include "qcow2/hex.h"

namespace uqcow::qcow2 {

namespace {

std::span<std::byte> bytes_of(std::vector<uint8_t>& v) { return {reinterpret_cast<std::byte*>(v.data()), v.size()}; }

// A range [offset, offset + bytes) of the image file, checked against its
// length: `field` names what points there.
Status within_file(const BlockDevice& file, uint64_t offset, uint64_t bytes, const std::string& field) {
  UQ_ASSIGN_OR_RETURN(const uint64_t length, file.length());
  if (offset > length || bytes > length - offset) {
    return Error(EINVAL, field + " " + hex(offset) + " (+" + std::to_string(bytes) + " bytes) lies beyond the end of the file");
  }
  return Status();
}

uint64_t now_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

}  // namespace

PersistentBitmaps::PersistentBitmaps(BlockDevice& file, Header& header, const Geometry& geo, Refcounts* refcounts,
                                     OverlapGuard& overlap)
    : file_(file), header_(header), geo_(geo), refcounts_(refcounts), overlap_(overlap) {}

// ---------------------------------------------------------------------------
// Loading.

Task<Status> PersistentBitmaps::load(uint64_t disk_size) {
  disk_size_ = disk_size;
  // Without the autoclear bit, a program that does not know bitmaps wrote
  // the image since they were stored: QEMU ignores them (and a read-write
  // open drops the extension, which the facade does).
  if (!header_.bitmaps || !(header_.autoclear_features & kAutoclearBitmaps)) co_return Status();
  const BitmapsExtension ext = *header_.bitmaps;
  if (ext.directory_size == 0 || ext.directory_size > kMaxBitmapDirectoryBytes) {
    co_return Error(EINVAL, "bitmap_directory_size " + std::to_string(ext.directory_size) + " is out of range");
  }
  UQ_CO_TRY(within_file(file_, ext.directory_offset, ext.directory_size, "bitmap_directory_offset"));
  std::vector<uint8_t> dir(ext.directory_size);
  UQ_CO_TRY(co_await file_.co_read(ext.directory_offset, bytes_of(dir)));
  UQ_CO_ASSIGN_OR_RETURN(auto entries, parse_bitmap_directory(dir, ext.nb_bitmaps, geo_.cluster_size, disk_size));
  for (auto& e : entries) {
    auto b = std::make_unique<Bitmap>();
    b->name = std::move(e.name);
    b->granularity_bits = e.granularity_bits;
    b->enabled = e.enabled();
    b->inconsistent = e.in_use();
    b->changed = false;
    b->table_offset = e.table_offset;
    b->table_size = e.table_size;
    if (!b->inconsistent) {
      Status s = co_await load_data(*b);
      if (!s.ok()) co_return std::move(s).error().with_context("bitmap '" + b->name + "'");
    }
    bitmaps_.push_back(std::move(b));
  }
  refresh_enabled();
  co_return Status();
}

Task<Result<std::vector<uint64_t>>> PersistentBitmaps::read_table(uint64_t offset, uint32_t entries) {
  // entries * cluster_size <= 512 MiB (parse_bitmap_directory): at most
  // 1 Mi entries here.
  UQ_CO_TRY(within_file(file_, offset, uint64_t{entries} * 8, "bitmap_table_offset"));
  std::vector<uint8_t> raw(uint64_t{entries} * 8);
  UQ_CO_TRY(co_await file_.co_read(offset, bytes_of(raw)));
  std::vector<uint64_t> table(entries);
  for (uint32_t i = 0; i < entries; ++i) {
    table[i] = load_be64(&raw[uint64_t{i} * 8]);
    std::string why = bitmap_table_entry_problem(table[i], geo_.cluster_size);
    if (!why.empty()) {
      co_return Error(EINVAL, "bitmap table entry " + std::to_string(i) + " (" + hex(table[i]) + "): " + why);
    }
  }
  co_return table;
}

Task<Status> PersistentBitmaps::load_data(Bitmap& b) {
  UQ_CO_ASSIGN_OR_RETURN(DirtyBitmap bits, DirtyBitmap::create(disk_size_, uint64_t{1} << b.granularity_bits));
  const uint64_t want = bitmap_table_entries(disk_size_, b.granularity_bits, geo_.cluster_size);
  if (b.table_size != want) {
    co_return Error(EINVAL, "bitmap_table_size " + std::to_string(b.table_size) + " is not the " +
                                std::to_string(want) + " entries the disk needs");
  }
  UQ_CO_ASSIGN_OR_RETURN(auto table, co_await read_table(b.table_offset, b.table_size));
  std::vector<uint8_t> cluster(geo_.cluster_size);
  for (uint32_t i = 0; i < b.table_size; ++i) {
    const uint64_t data = table[i] & kBitmapTableOffsetMask;
    const uint64_t at = uint64_t{i} * geo_.cluster_size;  // serialised byte offset
    if (data == 0) {
      if (table[i] & kBitmapTableAllOnes) bits.set_serialized_range(at, geo_.cluster_size);
      continue;
    }
    UQ_CO_TRY(within_file(file_, data, geo_.cluster_size, "bitmap data cluster"));
    UQ_CO_TRY(co_await file_.co_read(data, bytes_of(cluster)));
    bits.deserialize(at, cluster);
  }
  b.bits.emplace(std::move(bits));
  co_return Status();
}

bool PersistentBitmaps::has_consistent() const {
  for (const auto& b : bitmaps_) {
    if (!b->inconsistent) return true;
  }
  return false;
}

Task<Status> PersistentBitmaps::mark_in_use() {
  last_store_ns_ = now_ns();
  if (!has_consistent()) co_return Status();
  // The directory on disk is not the one in memory (bitmaps added or
  // removed since the last store): a new one, with IN_USE set.
  if (!header_.bitmaps || directory_changed_ || !dropped_.empty()) co_return co_await store(/*clear_in_use=*/false);
  const BitmapsExtension ext = *header_.bitmaps;
  auto entries = directory_entries(/*clear_in_use=*/false);
  UQ_CO_ASSIGN_OR_RETURN(std::vector<uint8_t> dir, serialize_bitmap_directory(entries));
  if (dir.size() != ext.directory_size) {
    co_return Error(EINVAL, "bitmap directory: rewriting it gives " + std::to_string(dir.size()) +
                                " bytes, bitmap_directory_size says " + std::to_string(ext.directory_size));
  }
  // The directory is rewritten in place only while the autoclear bit is
  // clear: a crash in between leaves the bitmaps ignored (leaked clusters),
  // never a half-written directory taken as valid.
  const uint64_t with = header_.autoclear_features;
  const uint64_t without = with & ~kAutoclearBitmaps;
  UQ_CO_TRY(co_await write_header_fields(file_, {kOffAutoclear, without}));
  UQ_CO_TRY(co_await file_.co_flush());
  header_.autoclear_features = without;
  UQ_CO_TRY(overlap_.check_metadata_write(ext.directory_offset, dir.size(), "bitmap directory",
                                          overlap_bit(MetadataKind::kBitmapDirectory)));
  UQ_CO_TRY(co_await file_.co_write(ext.directory_offset, bytes_of(dir)));
  UQ_CO_TRY(co_await file_.co_flush());
  UQ_CO_TRY(co_await write_header_fields(file_, {kOffAutoclear, with}));
  UQ_CO_TRY(co_await file_.co_flush());
  header_.autoclear_features = with;
  in_use_on_disk_ = true;
  co_return Status();
}

// ---------------------------------------------------------------------------
// Storing.

std::vector<BitmapDirEntry> PersistentBitmaps::directory_entries(bool clear_in_use) const {
  std::vector<BitmapDirEntry> out;
  for (const auto& b : bitmaps_) {
    BitmapDirEntry e;
    e.name = b->name;
    e.granularity_bits = static_cast<uint8_t>(b->granularity_bits);
    e.table_offset = b->table_offset;
    e.table_size = b->table_size;
    // An inconsistent bitmap keeps IN_USE; a consistent one has it while
    // the image is open read-write.
    e.flags = (b->enabled ? kBitmapAuto : 0) | (b->inconsistent || !clear_in_use ? kBitmapInUse : 0);
    out.push_back(std::move(e));
  }
  return out;
}

Task<Result<PersistentBitmaps::Table>> PersistentBitmaps::write_bitmap(const Bitmap& b) {
  const DirtyBitmap& bits = *b.bits;
  const uint64_t cs = geo_.cluster_size;
  const uint64_t entries = (bits.serialized_bytes() + cs - 1) / cs;
  std::vector<uint64_t> table(entries, 0);
  std::vector<uint8_t> cluster(cs);
  // On failure the clusters written so far are freed again.
  Table written{0, static_cast<uint32_t>(entries)};
  auto undo = [&]() -> Task<void> {
    for (uint64_t off : table) {
      if (off) (void)co_await refcounts_->update_refcount(off, cs, -1, false);
    }
  };
  for (uint64_t i = 0; i < entries; ++i) {
    if (!bits.any_in_serialized_range(i * cs, cs)) continue;  // all zeros: offset 0
    auto off = co_await refcounts_->alloc_clusters(1);
    Status s = off.ok() ? overlap_.check_metadata_write(*off, cs, "bitmap data") : Status(off.error());
    if (s.ok()) {
      table[i] = *off;
      bits.serialize(i * cs, cluster);
      s = co_await file_.co_write(*off, bytes_of(cluster));
    }
    if (!s.ok()) {
      co_await undo();
      co_return s.error();
    }
  }
  std::vector<uint8_t> raw(entries * 8);
  for (uint64_t i = 0; i < entries; ++i) store_be64(&raw[i * 8], table[i]);
  const uint64_t table_clusters = (raw.size() + cs - 1) / cs;
  raw.resize(table_clusters * cs, 0);
  auto off = co_await refcounts_->alloc_clusters(table_clusters);
  Status s = off.ok() ? overlap_.check_metadata_write(*off, raw.size(), "bitmap table") : Status(off.error());
  if (s.ok()) s = co_await file_.co_write(*off, bytes_of(raw));
  if (!s.ok()) {
    if (off.ok()) (void)co_await refcounts_->update_refcount(*off, raw.size(), -1, false);
    co_await undo();
    co_return s.error();
  }
  written.offset = *off;
  co_return written;
}

Task<Status> PersistentBitmaps::free_table(Table t) {
  if (t.offset == 0) co_return Status();
  UQ_CO_ASSIGN_OR_RETURN(auto table, co_await read_table(t.offset, t.size));
  for (uint64_t e : table) {
    const uint64_t data = e & kBitmapTableOffsetMask;
    if (data) UQ_CO_TRY(co_await refcounts_->update_refcount(data, geo_.cluster_size, -1, true));
  }
  co_return co_await refcounts_->update_refcount(t.offset, uint64_t{t.size} * 8, -1, true);
}

Task<Status> PersistentBitmaps::write_header_extension(std::optional<BitmapsExtension> ext, bool& written) {
  // What the new header points at is on disk, with its refcounts, first.
  UQ_CO_TRY(co_await refcounts_->cache().flush());
  UQ_CO_TRY(co_await file_.co_flush());
  Header h = header_;
  h.bitmaps = ext;
  if (ext) {
    h.autoclear_features |= kAutoclearBitmaps;
  } else {
    h.autoclear_features &= ~kAutoclearBitmaps;
  }
  UQ_CO_TRY(co_await write_header(file_, h));
  // Written: whatever the sync below says, reads of the file now see the
  // new header, so memory follows it.
  written = true;
  header_.bitmaps = h.bitmaps;
  header_.autoclear_features = h.autoclear_features;
  co_return co_await file_.co_flush();
}

Task<Status> PersistentBitmaps::store_on_flush(uint64_t interval_seconds) {
  if (!refcounts_ || !in_use_on_disk_) co_return Status();
  if (now_ns() - last_store_ns_ < interval_seconds * 1000000000ull) co_return Status();
  co_return co_await store(/*clear_in_use=*/true);
}

Task<Status> PersistentBitmaps::store(bool clear_in_use) {
  if (!refcounts_) co_return Status();  // read-only: nothing changes on disk
  bool dirty = directory_changed_ || !dropped_.empty() || (clear_in_use == in_use_on_disk_);
  for (const auto& b : bitmaps_) dirty |= b->bits && b->changed;
  if (!dirty) co_return Status();
  // From here on a writer must set IN_USE again (and wait for the lock we
  // hold) before it marks: what it marks may miss the bits stored below.
  // A failed store leaves it false: the next writer rewrites IN_USE, which
  // the old directory still has, harmlessly.
  if (clear_in_use) in_use_on_disk_ = false;
  last_store_ns_ = now_ns();

  // 1. Changed bitmaps go to fresh clusters; the old tables stay valid (the
  // header still points at the old directory) until step 3.
  std::vector<Table> replaced;
  std::vector<std::pair<Bitmap*, Table>> fresh;
  auto undo_fresh = [&]() -> Task<void> {
    for (auto& [b, t] : fresh) (void)co_await free_table(t);
  };
  for (const auto& b : bitmaps_) {
    if (!b->bits || !b->changed) continue;
    auto t = co_await write_bitmap(*b);
    if (!t.ok()) {
      co_await undo_fresh();
      co_return std::move(t).error().with_context("storing bitmap '" + b->name + "'");
    }
    fresh.emplace_back(b.get(), *t);
  }
  // 2. The new directory, in fresh clusters.
  std::vector<BitmapDirEntry> entries = directory_entries(clear_in_use);
  for (size_t i = 0, f = 0; i < bitmaps_.size(); ++i) {
    if (f < fresh.size() && fresh[f].first == bitmaps_[i].get()) {
      entries[i].table_offset = fresh[f].second.offset;
      entries[i].table_size = fresh[f].second.size;
      ++f;
    }
  }
  std::optional<BitmapsExtension> ext;
  uint64_t dir_offset = 0;
  if (!entries.empty()) {
    auto dir = serialize_bitmap_directory(entries);
    if (!dir.ok()) {
      co_await undo_fresh();
      co_return std::move(dir).error().with_context("storing the bitmap directory");
    }
    // Not inside `?:`: GCC 12 frees the result of a co_await in a
    // conditional expression before it is used (a use-after-free of the
    // error message when the directory write failed).
    auto off = co_await refcounts_->write_new_metadata(*dir, MetadataKind::kBitmapDirectory);
    if (!off.ok()) {
      co_await undo_fresh();
      co_return std::move(off).error().with_context("storing the bitmap directory");
    }
    dir_offset = *off;
    ext = BitmapsExtension{.nb_bitmaps = static_cast<uint32_t>(entries.size()),
                           .directory_size = dir->size(),
                           .directory_offset = dir_offset};
  }
  // 3. The header switches to the new directory (durably, after it).
  const std::optional<BitmapsExtension> old = header_.autoclear_features & kAutoclearBitmaps
                                                  ? header_.bitmaps
                                                  : std::nullopt;
  bool header_written = false;
  Status s = co_await write_header_extension(ext, header_written);
  if (!s.ok() && !header_written) {
    if (ext) {
      overlap_.remove(MetadataKind::kBitmapDirectory, dir_offset, round_up(ext->directory_size, geo_.cluster_size));
      (void)co_await refcounts_->update_refcount(dir_offset, ext->directory_size, -1, false);
    }
    co_await undo_fresh();
    co_return std::move(s).error().with_context("writing the bitmaps extension");
  }
  // 4. The new directory is in effect (memory follows the header written).
  for (auto& [b, t] : fresh) {
    if (b->table_offset) replaced.push_back(Table{b->table_offset, b->table_size});
    b->table_offset = t.offset;
    b->table_size = t.size;
    b->changed = false;
  }
  directory_changed_ = false;
  in_use_on_disk_ = !clear_in_use && has_consistent();
  if (old) {
    overlap_.remove(MetadataKind::kBitmapDirectory, old->directory_offset,
                    round_up(old->directory_size, geo_.cluster_size));
  }
  if (!s.ok()) {
    // The header was written but its sync failed: a crash may still find
    // the old one, so nothing the old directory references is freed (they
    // leak), and IN_USE counts as cleared (the next write sets it again).
    dropped_.clear();
    in_use_on_disk_ = false;
    co_return std::move(s).error().with_context("syncing the bitmaps extension");
  }
  // 5. What only the old directory referenced is freed.
  std::vector<Table> to_free = std::move(dropped_);
  dropped_.clear();
  to_free.insert(to_free.end(), replaced.begin(), replaced.end());
  if (old) {
    UQ_CO_TRY(co_await refcounts_->update_refcount(old->directory_offset, old->directory_size, -1, true));
  }
  for (const Table& t : to_free) UQ_CO_TRY(co_await free_table(t));
  co_return Status();
}

// ---------------------------------------------------------------------------
// Queries and qemu-img bitmap's actions.

PersistentBitmaps::Bitmap* PersistentBitmaps::lookup(const std::string& name) const {
  for (const auto& b : bitmaps_) {
    if (b->name == name) return b.get();
  }
  return nullptr;
}

void PersistentBitmaps::refresh_enabled() {
  enabled_.clear();
  for (const auto& b : bitmaps_) {
    if (b->bits && b->enabled) enabled_.push_back(b.get());
  }
}

std::vector<BitmapInfo> PersistentBitmaps::list() const {
  std::vector<BitmapInfo> out;
  for (const auto& b : bitmaps_) {
    out.push_back(BitmapInfo{.name = b->name,
                             .granularity = uint64_t{1} << b->granularity_bits,
                             .in_use = b->inconsistent || in_use_on_disk_,  // as on disk
                             .enabled = b->enabled,
                             .inconsistent = b->inconsistent});
  }
  return out;
}

Result<const DirtyBitmap*> PersistentBitmaps::find(const std::string& name) const {
  Bitmap* b = lookup(name);
  if (!b) return Error(ENOENT, "Dirty bitmap '" + name + "' not found");
  if (!b->bits) return Error(EINVAL, "Bitmap '" + name + "' is inconsistent and cannot be used");
  return static_cast<const DirtyBitmap*>(&*b->bits);
}

Status PersistentBitmaps::add(const std::string& name, uint64_t granularity, bool enabled) {
  if (header_.version < 3) return Error(EINVAL, "Cannot store dirty bitmaps in qcow2 v2 files");
  if (lookup(name)) return Error(EEXIST, "Bitmap already exists: " + name);
  UQ_TRY(check_bitmap_constraints(name, granularity, disk_size_, geo_.cluster_size));
  if (bitmaps_.size() + 1 > kMaxBitmaps) return Error(EINVAL, "Maximum number of persistent bitmaps is already reached");
  uint64_t dir_bytes = bitmap_dir_entry_bytes(name.size());
  for (const auto& b : bitmaps_) dir_bytes += bitmap_dir_entry_bytes(b->name.size());
  if (dir_bytes > kMaxBitmapDirectoryBytes) return Error(EINVAL, "Not enough space in the bitmap directory");
  UQ_ASSIGN_OR_RETURN(DirtyBitmap bits, DirtyBitmap::create(disk_size_, granularity));
  auto b = std::make_unique<Bitmap>();
  b->name = name;
  b->granularity_bits = bits.granularity_bits();
  b->enabled = enabled;
  b->bits.emplace(std::move(bits));
  bitmaps_.push_back(std::move(b));
  directory_changed_ = true;
  refresh_enabled();
  return Status();
}

Status PersistentBitmaps::remove(const std::string& name) {
  auto it = std::find_if(bitmaps_.begin(), bitmaps_.end(), [&](const auto& b) { return b->name == name; });
  if (it == bitmaps_.end()) return Error(ENOENT, "Dirty bitmap '" + name + "' not found");
  if ((*it)->table_offset) dropped_.push_back(Table{(*it)->table_offset, (*it)->table_size});
  bitmaps_.erase(it);
  directory_changed_ = true;
  refresh_enabled();
  return Status();
}

Status PersistentBitmaps::clear(const std::string& name) {
  Bitmap* b = lookup(name);
  if (!b) return Error(ENOENT, "Dirty bitmap '" + name + "' not found");
  if (!b->bits) return Error(EINVAL, "Bitmap '" + name + "' is inconsistent and cannot be used");
  b->bits->clear();
  b->changed = true;
  return Status();
}

Status PersistentBitmaps::set_enabled(const std::string& name, bool enabled) {
  Bitmap* b = lookup(name);
  if (!b) return Error(ENOENT, "Dirty bitmap '" + name + "' not found");
  if (!b->bits) return Error(EINVAL, "Bitmap '" + name + "' is inconsistent and cannot be used");
  if (b->enabled != enabled) directory_changed_ = true;
  b->enabled = enabled;
  refresh_enabled();
  return Status();
}

Status PersistentBitmaps::merge(const std::string& name, const DirtyBitmap& src) {
  Bitmap* b = lookup(name);
  if (!b) return Error(ENOENT, "Dirty bitmap '" + name + "' not found");
  if (!b->bits) return Error(EINVAL, "Bitmap '" + name + "' is inconsistent and cannot be used");
  b->bits->merge_from(src);
  b->changed = true;
  return Status();
}

Status PersistentBitmaps::check_resize() const {
  for (const auto& b : bitmaps_) {
    if (!b->bits) {
      return Error(ENOTSUP, "Bitmap '" + b->name + "' is inconsistent and cannot be used\n"
                            "Try 'uqcow bitmap --remove' to delete this bitmap from disk");
    }
  }
  return Status();
}

void PersistentBitmaps::resize(uint64_t new_size) {
  disk_size_ = new_size;
  for (const auto& b : bitmaps_) {
    if (!b->bits) continue;
    b->bits->resize(new_size);
    b->changed = true;
  }
}

}  // namespace uqcow::qcow2
