#include "block/debug_event.h"

namespace uqcow {
namespace {
constexpr std::string_view kNames[] = {
#define UQCOW_BLKDBG_NAME(id, name) name,
    UQCOW_BLKDBG_EVENTS(UQCOW_BLKDBG_NAME)
#undef UQCOW_BLKDBG_NAME
};
static_assert(sizeof kNames / sizeof kNames[0] == kBlkDebugEventCount);
}  // namespace

std::string_view blkdebug_event_name(BlkDebugEvent event) {
  auto i = static_cast<unsigned>(event);
  return i < kBlkDebugEventCount ? kNames[i] : std::string_view("none");
}

std::optional<BlkDebugEvent> parse_blkdebug_event(std::string_view name) {
  for (unsigned i = 0; i < kBlkDebugEventCount; ++i) {
    if (kNames[i] == name) return static_cast<BlkDebugEvent>(i);
  }
  return std::nullopt;
}

}  // namespace uqcow
