#include "tests/sim/workload.h"

#include <algorithm>

namespace uqcow::sim {
namespace {

constexpr uint64_t kMaxOpBytes = 3ull << 20;
constexpr size_t kMaxSnapshots = 4;

const char* kind_name(OpKind k) {
  switch (k) {
    case OpKind::kRead: return "read";
    case OpKind::kWrite: return "write";
    case OpKind::kWriteZeroes: return "write_zeroes";
    case OpKind::kDiscard: return "discard";
    case OpKind::kCompressed: return "write_compressed";
    case OpKind::kFlush: return "flush";
    case OpKind::kSnapshotCreate: return "snapshot_create";
    case OpKind::kSnapshotApply: return "snapshot_apply";
    case OpKind::kSnapshotDelete: return "snapshot_delete";
    case OpKind::kResize: return "resize";
  }
  return "?";
}

}  // namespace

std::string Op::describe() const {
  std::string s = "#" + std::to_string(id) + " " + kind_name(kind);
  switch (kind) {
    case OpKind::kRead:
    case OpKind::kWrite:
    case OpKind::kDiscard:
    case OpKind::kCompressed:
      s += " " + std::to_string(offset) + "+" + std::to_string(length);
      break;
    case OpKind::kWriteZeroes:
      s += " " + std::to_string(offset) + "+" + std::to_string(length) + (may_unmap ? " may_unmap" : " no_hole");
      break;
    case OpKind::kSnapshotCreate:
    case OpKind::kSnapshotApply:
    case OpKind::kSnapshotDelete:
      s += " " + snapshot;
      break;
    case OpKind::kResize:
      s += " " + std::to_string(new_size);
      break;
    case OpKind::kFlush:
      break;
  }
  s += " [t" + std::to_string(issue) + "..t" + (complete == kNever ? "in flight" : std::to_string(complete)) + "]";
  if (complete != kNever) s += status.ok() ? (no_op ? " refused (no effect)" : " ok") : " ERROR " + status.message();
  return s;
}

Workload::Workload(const Layout& layout, std::mt19937_64& rng) : layout_(layout), rng_(rng) {
  // Hot spots: L2 slice and table boundaries, a cluster boundary inside a
  // table, the start and the end of the disk. Three per seed.
  const uint64_t cs = layout.cluster_size;
  const uint64_t table_span = cs / (layout.extended_l2 ? 16 : 8) * cs;
  std::vector<uint64_t> spots = {0, layout.size / cs / 2 * cs, layout.size - std::min<uint64_t>(layout.size, cs)};
  for (uint64_t span : {layout.slice_span(), table_span}) {
    for (uint64_t at = span; at < layout.size && spots.size() < 12; at += span) spots.push_back(at);
  }
  std::shuffle(spots.begin(), spots.end(), rng_);
  hot_.assign(spots.begin(), spots.begin() + std::min<size_t>(3, spots.size()));
}

uint64_t Workload::pick_length() {
  const uint64_t cs = layout_.cluster_size;
  const uint64_t r = below(100);
  uint64_t len;
  if (r < 10) {
    len = 1 + below(16);
  } else if (r < 25) {
    len = 1 + below(511);
  } else if (r < 45) {
    len = 512 * (1 + below(std::max<uint64_t>(1, 2 * cs / 512)));
  } else if (r < 70) {
    len = 1 + below(2 * cs);
  } else if (r < 85) {
    len = cs * (1 + below(3));
  } else {
    len = 1 + below(std::max<uint64_t>(8 * cs, 64 << 10));
  }
  return std::min(len, kMaxOpBytes);
}

uint64_t Workload::pick_offset(uint64_t length, uint64_t size) {
  const int64_t cs = layout_.cluster_size;
  int64_t off;
  if (below(10) < 7) {
    off = static_cast<int64_t>(hot_[below(hot_.size())]) + static_cast<int64_t>(below(4 * cs)) - 2 * cs;
  } else {
    off = static_cast<int64_t>(below(size));
  }
  off = std::max<int64_t>(off, 0);
  const uint64_t r = below(10);
  uint64_t o = static_cast<uint64_t>(off);
  if (r < 3) {
    o &= ~uint64_t(cs - 1);
  } else if (r < 5) {
    o &= ~uint64_t(511);
  } else if (r < 6) {
    o &= ~uint64_t(layout_.subcluster_size() - 1);
  }
  return std::min(o, size - length);
}

uint64_t Workload::pick_smaller_size(const WorkloadState& st) {
  // A multiple of 512 in [min_size, size): a few sectors off the end (often
  // inside the last cluster), the last cluster boundary or one a cluster or
  // two below it, a few clusters and part of one, or anywhere down to the
  // minimum (dropping L2 tables and refcount blocks).
  const uint64_t cs = layout_.cluster_size;
  uint64_t drop;
  switch (below(4)) {
    case 0:
      drop = 512 * (1 + below(8));
      break;
    case 1:
      drop = st.size - (st.size - 1) / cs * cs + cs * below(3);
      break;
    case 2:
      drop = cs * (1 + below(3)) + 512 * below(cs / 512);
      break;
    default:
      drop = 512 * (1 + below((st.size - st.min_size) / 512));
      break;
  }
  return st.size - std::min(drop, st.size - st.min_size);
}

void Workload::fill(Op& op) {
  op.buf.resize(op.length);
  if (op.writes_data()) {
    data_bytes(op.id, op.offset, op.runs, std::span(reinterpret_cast<uint8_t*>(op.buf.data()), op.buf.size()));
  } else {
    std::fill(op.buf.begin(), op.buf.end(), std::byte{0xee});
  }
}

Op Workload::next(uint64_t id, WorkloadState& st) {
  Op op;
  op.id = id;
  const uint64_t cs = layout_.cluster_size;
  for (;;) {
    const uint64_t r = below(1000);
    op.kind = r < 290   ? OpKind::kRead
              : r < 590 ? OpKind::kWrite
              : r < 690 ? OpKind::kWriteZeroes
              : r < 780 ? OpKind::kDiscard
              : r < 850 ? OpKind::kCompressed
              : r < 910 ? OpKind::kFlush
              : r < 935 ? OpKind::kSnapshotCreate
              : r < 960 ? OpKind::kSnapshotApply
              : r < 980 ? OpKind::kSnapshotDelete
                        : OpKind::kResize;
    switch (op.kind) {
      case OpKind::kRead:
      case OpKind::kWrite:
      case OpKind::kWriteZeroes:
      case OpKind::kDiscard:
        op.length = std::min(pick_length(), st.size);
        op.offset = pick_offset(op.length, st.size);
        op.may_unmap = below(2) == 0;
        op.runs = below(8) == 0;
        fill(op);
        return op;
      case OpKind::kCompressed: {
        if (!layout_.compression()) continue;
        // One cluster (or the disk's partial last one): a compressed write is
        // refused (EIO) on an allocated cluster, and one cluster is all or
        // nothing.
        const uint64_t clusters = (st.size + cs - 1) / cs;
        op.offset = std::min(pick_offset(1, st.size) / cs, clusters - 1) * cs;
        op.length = std::min(cs, st.size - op.offset);
        op.runs = below(5) != 0;  // else incompressible: written normally
        fill(op);
        return op;
      }
      case OpKind::kFlush:
        return op;
      case OpKind::kSnapshotCreate:
        if (!layout_.snapshots || st.snapshots.size() + st.snapshot_names_used.size() >= kMaxSnapshots) continue;
        if (layout_.v2 && st.resize_in_batch) continue;  // see kResize
        op.snapshot = "s" + std::to_string(next_snapshot_++);
        st.snapshot_names_used.insert(op.snapshot);
        return op;
      case OpKind::kSnapshotApply:
        if (st.bitmaps) continue;
        [[fallthrough]];
      case OpKind::kSnapshotDelete: {
        // One op per snapshot and batch; apply only a snapshot of the
        // current size (applying a smaller one would shrink the disk) and
        // never beside a resize.
        std::vector<std::string> names;
        for (const auto& [name, size] : st.snapshots) {
          if (st.snapshot_names_used.count(name)) continue;
          if (op.kind == OpKind::kSnapshotApply && (size != st.size || st.resize_in_batch)) continue;
          names.push_back(name);
        }
        if (names.empty()) continue;
        op.snapshot = names[below(names.size())];
        st.snapshot_names_used.insert(op.snapshot);
        if (op.kind == OpKind::kSnapshotApply) st.apply_in_batch = true;
        return op;
      }
      case OpKind::kResize: {
        if (st.resize_in_batch || st.apply_in_batch) continue;
        // QEMU (and uqcow) refuse to resize a compat=0.10 image that has
        // snapshots: one snapshot, or one being created, rules it out.
        if (layout_.v2 && (!st.snapshots.empty() || !st.snapshot_names_used.empty())) continue;
        const bool can_grow = st.size < st.max_size, can_shrink = st.size > st.min_size;
        if (!can_grow && !can_shrink) continue;
        if (can_shrink && (!can_grow || below(2) == 0)) {
          op.new_size = pick_smaller_size(st);
        } else {
          const uint64_t grow = cs * below(3) + 512 * (1 + below(8));
          op.new_size = std::min(st.max_size, st.size + grow);
        }
        st.resize_in_batch = true;
        return op;
      }
    }
  }
}

}  // namespace uqcow::sim
