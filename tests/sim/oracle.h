// The oracle of the simulation: which values a byte may hold when it is
// observed, given the guest operations of one batch and their times.
//
// Time is the driver's logical clock: every guest op has an issue tick and
// a completion tick (kNever while it is still in flight). What each op may
// have done to a byte range is an Effect:
// - STRONG writes (write, write_zeroes, write_compressed, snapshot_apply)
//   give the byte their value and supersede what was there;
// - WEAK writes give the byte a possible value but supersede nothing: a
//   discard (the byte reads as zero or as before, as NBD's TRIM allows),
//   the read-modify-write of an unaligned write to an encrypted image,
//   which may write back the bytes around its range as it read them (a
//   documented property of the engine: qcow2/image.h, unaligned_write_lock_),
//   and, in a crash image that kept the old size, what a shrink drops: zeros
//   (the tail zeroed, clusters unallocated), or the backing file's bytes
//   under the unallocated clusters.
//
// A byte observed over [issue, complete] (a read, a snapshot being taken, a
// crash) may hold:
//   1. the value of any effect overlapping the observation in time
//      (e.issue < complete && e.complete > issue);
//   2. the value of any effect completed before `issue` that no strong
//      effect superseded (one issued after it completed and completed
//      before `issue`);
//   3. the byte's value at the start of the batch, if no strong effect on
//      it completed before `issue`.
// A weak read-modify-write contributes, instead of one value, every value
// the byte could hold while that op ran (the same rules over its interval).
//
// Anything else is a failure: in particular another offset's data (a read
// that went to a host cluster reused by another guest offset), another op's
// data, or old data a completed strong write should have replaced.
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace uqcow::sim {

constexpr uint64_t kNever = std::numeric_limits<uint64_t>::max();  // not completed

// The byte a write op puts at a guest offset. It identifies the op and the
// offset: a read that returns another op's data or another offset's data
// gets (with overwhelming probability over a few bytes) other values. Never
// zero, so data is never mistaken for a zeroed byte. `runs` makes the data
// compressible (one value per 32-byte run) for compressed writes.
//
// One 64-bit hash gives the bytes of 8 consecutive offsets (data_bytes()
// fills ranges with one hash per 8 bytes); the offset's group is part of
// the hash, so data shifted by any distance still differs.
inline uint64_t data_word(uint64_t op, uint64_t group) {
  uint64_t x = (op << 40) ^ (op >> 24) ^ group;
  x *= 0x9e3779b97f4a7c15ull;
  x ^= x >> 32;
  x *= 0xd6e8feb86659fd93ull;
  return x ^ (x >> 29);
}
inline uint8_t nonzero(uint64_t byte) { return static_cast<uint8_t>((byte & 0xff) % 255 + 1); }
inline uint8_t data_byte(uint64_t op, uint64_t offset, bool runs) {
  if (runs) return nonzero(data_word(op, (offset >> 5) | (1ull << 39)));
  return nonzero(data_word(op, offset >> 3) >> (8 * (offset & 7)));
}
// data_byte() of [offset, offset + out.size()), a hash per 8 bytes.
void data_bytes(uint64_t op, uint64_t offset, bool runs, std::span<uint8_t> out);

struct Effect {
  enum class Kind {
    kData,     // strong: data_byte(op, offset, runs)
    kZero,     // strong: 0 (write_zeroes)
    kContent,  // strong: (*content)[offset] (snapshot_apply)
    kTrim,     // weak: 0 (discard)
    kRestore,  // weak: what the byte held while the op ran (encrypted RMW)
    kBacking,  // weak: (*content)[offset], the backing file's byte (unallocated)
  };
  Kind kind = Kind::kData;
  uint64_t begin = 0, end = 0;  // guest bytes
  uint64_t issue = 0, complete = kNever;
  uint64_t op = 0;
  bool runs = false;
  std::shared_ptr<const std::vector<uint8_t>> content;

  bool strong() const { return kind == Kind::kData || kind == Kind::kZero || kind == Kind::kContent; }
  // value() of [offset, offset + out.size()).
  void values(uint64_t offset, std::span<uint8_t> out) const;
  uint8_t value(uint64_t offset) const {
    switch (kind) {
      case Kind::kData: return data_byte(op, offset, runs);
      case Kind::kContent:
      case Kind::kBacking: return content && offset < content->size() ? (*content)[offset] : 0;
      case Kind::kZero:
      case Kind::kTrim:
      case Kind::kRestore: return 0;
    }
    return 0;
  }
};

class History {
 public:
  // `start`: the exact guest content at the start of the batch (bytes past
  // its end are zero).
  explicit History(std::shared_ptr<const std::vector<uint8_t>> start) : start_(std::move(start)) {}

  void add(Effect e) { effects_.push_back(std::move(e)); }
  const std::vector<Effect>& effects() const { return effects_; }

  // Checks bytes `got` of guest offset `offset` observed over [issue,
  // complete] (complete = kNever: a crash image, where ops still in flight
  // have complete = kNever too). Returns "" when every byte is allowed, else
  // a description of the first byte that is not: its value, the allowed
  // values and where they come from, and whose data it looks like.
  std::string check(uint64_t offset, std::span<const uint8_t> got, uint64_t issue, uint64_t complete) const;

 private:
  // A possible origin of a byte's value: an effect, or the batch start.
  struct Source {
    const Effect* effect = nullptr;  // nullptr: the batch start
    bool operator==(const Source&) const = default;
  };
  uint8_t start_byte(uint64_t offset) const { return offset < start_->size() ? (*start_)[offset] : 0; }
  uint8_t source_byte(const Source& s, uint64_t offset) const {
    return s.effect ? s.effect->value(offset) : start_byte(offset);
  }
  // The sources of a byte covered by exactly the effects `covering`,
  // observed over [issue, complete]; `skip` is left out (a read-modify-write
  // does not restore its own bytes).
  void sources(const std::vector<const Effect*>& covering, uint64_t issue, uint64_t complete, const Effect* skip,
               int depth, std::vector<Source>& out) const;
  std::string explain(uint64_t offset, std::span<const uint8_t> got, size_t at, uint64_t issue, uint64_t complete,
                      const std::vector<Source>& allowed) const;

  std::shared_ptr<const std::vector<uint8_t>> start_;
  std::vector<Effect> effects_;
};

}  // namespace uqcow::sim
