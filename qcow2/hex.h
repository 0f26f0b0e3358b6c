// hex(): offsets and raw entries in error messages, written as QEMU writes
// them ("0x52a00").
#pragma once

#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <string>

namespace uqcow::qcow2 {

inline std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%" PRIx64, v);
  return buf;
}

}  // namespace uqcow::qcow2
