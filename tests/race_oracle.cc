#include "tests/race_oracle.h"

#include <algorithm>
#include <cstdio>

namespace uqcow::testing {

uint8_t race_byte(uint64_t id, uint64_t offset) {
  // splitmix64 of (id, offset): neighbouring offsets and ids give unrelated
  // bytes, so a shifted or foreign copy does not match by accident for long.
  uint64_t x = id * 0x9e3779b97f4a7c15ull + offset * 0xc2b2ae3d27d4eb4full;
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return static_cast<uint8_t>(1 + x % 255);
}

std::vector<uint8_t> race_data(uint64_t id, uint64_t offset, size_t length) {
  std::vector<uint8_t> data(length);
  for (size_t i = 0; i < length; ++i) data[i] = race_byte(id, offset + i);
  return data;
}

std::string RaceOp::describe() const {
  static const char* const kNames[] = {"read", "write", "trim", "write_zeroes", "write_zeroes(no_hole)", "flush"};
  std::string s = "#" + std::to_string(id) + " " + kNames[static_cast<int>(kind)] + " " + std::to_string(offset) +
                  "+" + std::to_string(length) + " [t" + std::to_string(issued) + "..";
  s += completed == kPending ? std::string("pending") : "t" + std::to_string(completed);
  s += "]";
  if (error != 0) s += " error " + std::to_string(error);
  return s;
}

// A stretch of the read covered by one set of ops, with what its bytes may
// hold.
struct RaceOracle::Segment {
  uint64_t begin = 0;
  uint64_t end = 0;
  bool start_allowed = true;  // no strong op completed before the read was issued
  bool zero_allowed = false;  // a zero write or trim is a candidate
  std::vector<const RaceOp*> candidates;
  std::vector<const RaceOp*> writers;  // the candidate WRITEs, latest completion first
};

::testing::AssertionResult RaceOracle::check(std::span<const RaceOp> batch, uint64_t offset,
                                             std::span<const uint8_t> got, uint64_t issued,
                                             uint64_t completed, bool explain) const {
  uint64_t end = offset + got.size();
  if (offset < base_ || end > base_ + start_.size()) {
    return ::testing::AssertionFailure() << "read " << offset << "+" << got.size() << " is outside the model";
  }
  std::vector<const RaceOp*> relevant;
  std::vector<uint64_t> cuts = {offset, end};
  for (const RaceOp& op : batch) {
    if (!op.changes_data() || op.issued > completed || op.end() <= offset || op.offset >= end) continue;
    relevant.push_back(&op);
    cuts.push_back(std::clamp(op.offset, offset, end));
    cuts.push_back(std::clamp(op.end(), offset, end));
  }
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());

  size_t bad = 0;
  std::string first;
  for (size_t c = 0; c + 1 < cuts.size(); ++c) {
    Segment seg;
    seg.begin = cuts[c];
    seg.end = cuts[c + 1];
    // The latest issue time of a strong op that completed before the read
    // was issued: every op that completed before it is superseded.
    bool superseding = false;
    uint64_t latest_strong_issue = 0;
    for (const RaceOp* op : relevant) {
      if (op->offset > seg.begin || op->end() < seg.end) continue;
      if (op->completed < issued && op->strong()) {
        superseding = true;
        latest_strong_issue = std::max(latest_strong_issue, op->issued);
      }
    }
    seg.start_allowed = !superseding;
    for (const RaceOp* op : relevant) {
      if (op->offset > seg.begin || op->end() < seg.end) continue;
      bool overlapping = op->completed > issued;
      bool current = op->completed < issued && !(superseding && latest_strong_issue > op->completed);
      if (!overlapping && !current) continue;
      seg.candidates.push_back(op);
      if (op->kind == RaceKind::kWrite) seg.writers.push_back(op);
      else seg.zero_allowed = true;
    }
    std::sort(seg.writers.begin(), seg.writers.end(),
              [](const RaceOp* a, const RaceOp* b) { return a->completed > b->completed; });

    for (uint64_t g = seg.begin; g < seg.end; ++g) {
      uint8_t v = got[g - offset];
      if (seg.start_allowed && v == start_[g - base_]) continue;
      if (v == 0 && seg.zero_allowed) continue;
      bool found = std::any_of(seg.writers.begin(), seg.writers.end(),
                               [&](const RaceOp* w) { return race_byte(w->id, g) == v; });
      if (found) continue;
      if (bad++ == 0 && explain) first = describe_byte(batch, seg, got.subspan(g - offset), g);
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  auto failure = ::testing::AssertionFailure() << bad << " of " << got.size() << " bytes wrong";
  if (explain) failure << "; first: " << first;
  return failure;
}

std::string RaceOracle::describe_byte(std::span<const RaceOp> batch, const Segment& seg, std::span<const uint8_t> got,
                                uint64_t g) const {
  char buf[160];
  std::snprintf(buf, sizeof buf, "guest offset %llu (0x%llx) reads 0x%02x", static_cast<unsigned long long>(g),
                static_cast<unsigned long long>(g), got[0]);
  std::string s = buf;
  s += "; it may be: ";
  if (seg.start_allowed) {
    std::snprintf(buf, sizeof buf, "0x%02x (before the batch), ", start_[g - base_]);
    s += buf;
  }
  for (const RaceOp* op : seg.candidates) {
    std::snprintf(buf, sizeof buf, "0x%02x (", op->value_at(g));
    s += buf + op->describe() + "), ";
  }
  if (!seg.start_allowed && got[0] == start_[g - base_]) s += "; it is the value before the batch (stale)";
  if (got[0] == 0) return s + "; zero";
  // Whose data is it? A run of bytes equal to a write's data at some offset.
  size_t run = std::min<size_t>(got.size(), 16);
  for (const RaceOp& op : batch) {
    if (op.kind != RaceKind::kWrite) continue;
    for (uint64_t src = op.offset; src + run <= op.end(); ++src) {
      bool same = true;
      for (size_t i = 0; i < run && same; ++i) same = race_byte(op.id, src + i) == got[i];
      if (same) {
        return s + "; it is the data " + op.describe() + " wrote at guest offset " + std::to_string(src);
      }
    }
  }
  return s + "; no write of the batch wrote these bytes anywhere";
}

}  // namespace uqcow::testing
