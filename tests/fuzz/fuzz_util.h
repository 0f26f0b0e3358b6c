// What the fuzz targets share: the thread's reactor, a private directory for
// the image under test, and the guard that keeps an arbitrary image from
// naming files outside that directory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "uring/reactor.h"

namespace uqcow::fuzz {

// The calling thread's reactor, created on first use and kept for the life
// of the process (libFuzzer calls the target millions of times).
uring::Reactor& reactor();

// Writes `data` to a file in a private directory, replacing the previous
// input, and returns its path. Aborts if it cannot (the fuzzer is useless
// then). `name` tells the targets' files apart ("input", "copy").
std::string write_input(std::span<const uint8_t> data, const char* name = "input.qcow2");

// True if the image may be opened: an external data file, if the header
// names one, is a plain name (no '/'), so it can only resolve inside the
// private directory. Images with an unparsable header pass: opening them must
// fail cleanly, which is worth exercising.
bool refers_only_to_private_files(std::span<const uint8_t> data);

// Largest guest range the open+read target reads, and the one block_status
// walks: bounded work per input whatever the virtual size.
inline constexpr uint64_t kMaxReadBytes = 16ull << 20;
inline constexpr uint64_t kMaxStatusBytes = 64ull << 20;

}  // namespace uqcow::fuzz
