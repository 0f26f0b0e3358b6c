#include "tests/sim/oracle.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>

namespace uqcow::sim {
namespace {

std::string hex8(uint8_t v) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "0x%02x", v);
  return buf;
}

const char* kind_name(Effect::Kind k) {
  switch (k) {
    case Effect::Kind::kData: return "data";
    case Effect::Kind::kZero: return "zeroes";
    case Effect::Kind::kContent: return "snapshot content";
    case Effect::Kind::kTrim: return "trim";
    case Effect::Kind::kRestore: return "read-modify-write";
    case Effect::Kind::kBacking: return "backing file (unallocated)";
  }
  return "?";
}

std::string ticks(uint64_t issue, uint64_t complete) {
  return "[t" + std::to_string(issue) + "..t" + (complete == kNever ? std::string("never") : std::to_string(complete)) +
         "]";
}

// How many bytes from got[at] match `value(y)` from y = `from` on, up to `limit`.
template <class F>
size_t run_matching(std::span<const uint8_t> got, size_t at, uint64_t from, uint64_t until, size_t limit, F value) {
  size_t n = 0;
  while (n < limit && at + n < got.size() && from + n < until && got[at + n] == value(from + n)) ++n;
  return n;
}

}  // namespace

void data_bytes(uint64_t op, uint64_t offset, bool runs, std::span<uint8_t> out) {
  size_t i = 0;
  if (runs) {
    while (i < out.size()) {
      const uint64_t run_end = ((offset + i) | 31) + 1;
      const size_t n = static_cast<size_t>(std::min<uint64_t>(run_end - offset - i, out.size() - i));
      std::memset(out.data() + i, data_byte(op, offset + i, true), n);
      i += n;
    }
    return;
  }
  for (; i < out.size() && ((offset + i) & 7); ++i) out[i] = data_byte(op, offset + i, false);
  for (; i + 8 <= out.size(); i += 8) {
    const uint64_t w = data_word(op, (offset + i) >> 3);
    for (int k = 0; k < 8; ++k) out[i + k] = nonzero(w >> (8 * k));
  }
  for (; i < out.size(); ++i) out[i] = data_byte(op, offset + i, false);
}

void Effect::values(uint64_t offset, std::span<uint8_t> out) const {
  switch (kind) {
    case Kind::kData:
      data_bytes(op, offset, runs, out);
      return;
    case Kind::kContent:
    case Kind::kBacking: {
      const uint64_t have = !content || offset >= content->size() ? 0 : std::min<uint64_t>(out.size(), content->size() - offset);
      if (have) std::memcpy(out.data(), content->data() + offset, have);
      std::memset(out.data() + have, 0, out.size() - have);
      return;
    }
    case Kind::kZero:
    case Kind::kTrim:
    case Kind::kRestore:
      std::memset(out.data(), 0, out.size());
      return;
  }
}

void History::sources(const std::vector<const Effect*>& covering, uint64_t issue, uint64_t complete,
                      const Effect* skip, int depth, std::vector<Source>& out) const {
  auto add = [&](Source s) {
    if (std::find(out.begin(), out.end(), s) == out.end()) out.push_back(s);
  };
  bool strong_before = false;
  for (const Effect* e : covering) {
    if (e != skip && e->strong() && e->complete < issue) strong_before = true;
  }
  // Latest first: the byte most often holds the last write's value, and the
  // per-byte check stops at the first source that matches.
  for (auto it = covering.rbegin(); it != covering.rend(); ++it) {
    const Effect* e = *it;
    if (e == skip || e->issue >= complete) continue;
    // Overlapping the observation, or completed before it and not
    // superseded by a strong effect issued after it completed.
    const bool visible = e->complete > issue || std::none_of(covering.begin(), covering.end(), [&](const Effect* s) {
      return s != skip && s->strong() && s->issue > e->complete && s->complete < issue;
    });
    if (!visible) continue;
    if (e->kind == Effect::Kind::kRestore) {
      // Whatever the byte could hold while the read-modify-write ran. The
      // depth bound only matters for chains of such ops, which the unaligned
      // write lock serialises (so each sees the previous one completed).
      if (depth < 6) sources(covering, e->issue, e->complete, e, depth + 1, out);
      continue;
    }
    add(Source{e});
  }
  if (!strong_before) add(Source{nullptr});
}

std::string History::check(uint64_t offset, std::span<const uint8_t> got, uint64_t issue, uint64_t complete) const {
  const uint64_t end = offset + got.size();
  std::vector<const Effect*> relevant;
  std::vector<uint64_t> cuts = {offset, end};
  for (const Effect& e : effects_) {
    if (e.begin >= end || e.end <= offset || e.issue >= complete) continue;
    relevant.push_back(&e);
    if (e.begin > offset) cuts.push_back(e.begin);
    if (e.end < end) cuts.push_back(e.end);
  }
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  std::vector<const Effect*> covering;
  std::vector<Source> allowed;
  for (size_t c = 0; c + 1 < cuts.size(); ++c) {
    const uint64_t lo = cuts[c], hi = cuts[c + 1];
    covering.clear();
    for (const Effect* e : relevant) {
      if (e->begin <= lo && e->end >= hi) covering.push_back(e);
    }
    allowed.clear();
    if (covering.empty()) {
      allowed.push_back(Source{nullptr});
      // Fast path: untouched bytes must equal the batch start.
      const uint64_t in_start = lo >= start_->size() ? 0 : std::min<uint64_t>(hi, start_->size()) - lo;
      if (in_start == hi - lo && std::memcmp(got.data() + (lo - offset), start_->data() + lo, in_start) == 0) continue;
    } else {
      sources(covering, issue, complete, nullptr, 0, allowed);
    }
    uint64_t b = lo;
    if (allowed.size() == 1 && allowed[0].effect) {
      // The common case: one source, compared a block at a time.
      const Effect& only = *allowed[0].effect;
      uint8_t expected[4096];
      while (b < hi) {
        const size_t n = static_cast<size_t>(std::min<uint64_t>(sizeof expected, hi - b));
        only.values(b, std::span(expected, n));
        if (std::memcmp(expected, got.data() + (b - offset), n) != 0) break;
        b += n;
      }
    }
    for (; b < hi; ++b) {
      const uint8_t v = got[b - offset];
      bool ok = false;
      for (const Source& s : allowed) {
        if (source_byte(s, b) == v) {
          ok = true;
          break;
        }
      }
      if (!ok) return explain(offset, got, static_cast<size_t>(b - offset), issue, complete, allowed);
    }
  }
  return "";
}

std::string History::explain(uint64_t offset, std::span<const uint8_t> got, size_t at, uint64_t issue,
                             uint64_t complete, const std::vector<Source>& allowed) const {
  const uint64_t b = offset + at;
  std::string s = "guest byte " + std::to_string(b) + " = " + hex8(got[at]) + " (observed over " +
                  ticks(issue, complete) + "); allowed:";
  for (const Source& src : allowed) {
    s += " " + hex8(source_byte(src, b));
    if (src.effect) {
      s += " (op #" + std::to_string(src.effect->op) + " " + kind_name(src.effect->kind) + " " +
           ticks(src.effect->issue, src.effect->complete) + ")";
    } else {
      s += " (batch start)";
    }
  }
  // How far the disagreement runs.
  size_t bad = 0;
  for (size_t i = at; i < got.size() && i < at + (1 << 20); ++i) {
    const uint64_t g = offset + i;
    bool ok = false;
    for (const Source& src : allowed) ok = ok || source_byte(src, g) == got[i];
    if (!ok) ++bad;
  }
  s += "; " + std::to_string(bad) + " bytes from here disagree with those sources";
  // Whose data is it? Search the batch's data effects, then the batch start.
  constexpr size_t kRun = 24;
  const size_t want = std::min(kRun, got.size() - at);
  if (run_matching(got, at, b, start_->size(), want, [&](uint64_t z) { return start_byte(z); }) == want) {
    bool allowed_start = false;
    for (const Source& src : allowed) allowed_start = allowed_start || !src.effect;
    if (!allowed_start) return s + "; the bytes here are this offset's batch-start content: a completed write was lost";
  }
  for (const Effect& e : effects_) {
    if (e.kind != Effect::Kind::kData) continue;
    for (uint64_t y = e.begin; y < e.end; ++y) {
      if (run_matching(got, at, y, e.end, want, [&](uint64_t z) { return e.value(z); }) == want) {
        s += "; the bytes here are op #" + std::to_string(e.op) + "'s data for guest offset " + std::to_string(y) +
             (y == b ? " (this offset: a value that op should not have left here)" : " (ANOTHER OFFSET)");
        return s;
      }
    }
  }
  if (std::any_of(got.begin() + at, got.begin() + at + want, [](uint8_t v) { return v != 0; })) {
    for (uint64_t y = 0; y + want <= start_->size(); ++y) {
      if (y != b && run_matching(got, at, y, start_->size(), want, [&](uint64_t z) { return start_byte(z); }) == want) {
        s += "; the bytes here are the batch-start content of guest offset " + std::to_string(y) + " (ANOTHER OFFSET)";
        return s;
      }
    }
  }
  if (std::all_of(got.begin() + at, got.begin() + at + want, [](uint8_t v) { return v == 0; })) {
    return s + "; the bytes here read as zeros, which no op allows here (data lost)";
  }
  return s + "; no op of this batch wrote these bytes anywhere (an older op's data, or an encrypted image's "
             "data decrypted with another offset's key)";
}

}  // namespace uqcow::sim
