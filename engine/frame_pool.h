// Per-thread free lists for coroutine frames.
//
// Every Task's frame comes from here, so a steady-state request path (a read
// that hits the L2 cache, say) performs no malloc: the frames of the previous
// request are reused. Frames are sized by the compiler and passed back to the
// sized operator delete, so no header is stored.
//
// Invariant: a block is only ever on the free list of the size class it was
// allocated for. Blocks freed on another thread than they were allocated on
// simply join that thread's list (the memory itself came from malloc).
#pragma once

#include <cstddef>

namespace uqcow::frame_pool {

void* allocate(std::size_t size);
void deallocate(void* p, std::size_t size) noexcept;

}  // namespace uqcow::frame_pool
