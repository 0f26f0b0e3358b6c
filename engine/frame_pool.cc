#include "engine/frame_pool.h"

#include <cstdlib>
#include <new>

namespace uqcow::frame_pool {
namespace {

constexpr std::size_t kGranule = 64;
constexpr std::size_t kClasses = 64;  // pooled frames up to 4 KiB
constexpr std::size_t kMaxCachedPerClass = 4096;

struct FreeBlock {
  FreeBlock* next;
};

struct Pool {
  FreeBlock* heads[kClasses] = {};
  std::size_t counts[kClasses] = {};

  ~Pool() {
    for (auto*& head : heads) {
      while (head) {
        FreeBlock* next = head->next;
        std::free(head);
        head = next;
      }
    }
  }
};

thread_local Pool pool;

std::size_t size_class(std::size_t size) { return (size + kGranule - 1) / kGranule; }

}  // namespace

void* allocate(std::size_t size) {
  std::size_t c = size_class(size);
  if (c < kClasses) {
    if (FreeBlock* b = pool.heads[c]) {
      pool.heads[c] = b->next;
      --pool.counts[c];
      return b;
    }
    void* p = std::malloc(c * kGranule);
    if (!p) throw std::bad_alloc();
    return p;
  }
  void* p = std::malloc(size);
  if (!p) throw std::bad_alloc();
  return p;
}

void deallocate(void* p, std::size_t size) noexcept {
  std::size_t c = size_class(size);
  if (c < kClasses && pool.counts[c] < kMaxCachedPerClass) {
    auto* b = static_cast<FreeBlock*>(p);
    b->next = pool.heads[c];
    pool.heads[c] = b;
    ++pool.counts[c];
    return;
  }
  std::free(p);
}

}  // namespace uqcow::frame_pool
