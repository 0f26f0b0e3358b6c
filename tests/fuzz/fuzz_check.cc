// Fuzz target: `check` and `check -r all` on an arbitrary image. The check
// runs read-only on the input, the repair on a writable copy of it.
//
// Property beyond "no crash": a repair that reports success (it stopped
// normally, no corruptions and no check errors left) must leave an image
// that a fresh read-only check also finds free of corruptions.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <span>
#include <string>

#include "engine/sync_wait.h"
#include "qcow2/check.h"
#include "tests/fuzz/fuzz_util.h"
#include "uring/raw_file.h"

namespace uqcow::fuzz {
namespace {

using qcow2::CheckResult;
using qcow2::RepairMode;

Task<Result<CheckResult>> check_file(const std::string& path, RepairMode mode) {
  UQ_CO_ASSIGN_OR_RETURN(auto file, RawFile::open(path, {.read_only = mode == RepairMode::kNone}));
  co_return co_await qcow2::check_image(*file, nullptr, mode);
}

bool repaired(const Result<CheckResult>& r) {
  return r.ok() && r->stopped.ok() && r->corruptions == 0 && r->check_errors == 0;
}

void report_and_abort(const Result<CheckResult>& repair, const Result<CheckResult>& after) {
  std::fprintf(stderr, "uqcow fuzz_check: -r all reported a clean image, a fresh check disagrees\n");
  if (after.ok()) {
    std::fprintf(stderr, "after: corruptions=%llu leaks=%llu check_errors=%llu stopped=%s\n",
                 static_cast<unsigned long long>(after->corruptions),
                 static_cast<unsigned long long>(after->leaks),
                 static_cast<unsigned long long>(after->check_errors),
                 after->stopped.ok() ? "no" : after->stopped.message().c_str());
    for (const auto& m : after->messages) std::fprintf(stderr, "  %s\n", m.c_str());
  } else {
    std::fprintf(stderr, "after: %s\n", after.error().message().c_str());
  }
  std::fprintf(stderr, "repair messages:\n");
  for (const auto& m : repair->messages) std::fprintf(stderr, "  %s\n", m.c_str());
  std::abort();
}

}  // namespace
}  // namespace uqcow::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace uqcow;
  using namespace uqcow::fuzz;
  std::span<const uint8_t> input(data, size);
  std::string path = write_input(input);
  auto checked = sync_wait(reactor(), check_file(path, RepairMode::kNone));
  if (!checked.ok()) return 0;  // no valid header: nothing to repair either

  std::string copy = write_input(input, "copy.qcow2");
  auto repair = sync_wait(reactor(), check_file(copy, RepairMode::kAll));
  if (!repaired(repair)) return 0;
  auto after = sync_wait(reactor(), check_file(copy, RepairMode::kNone));
  if (!after.ok() || !after->stopped.ok() || after->corruptions != 0) report_and_abort(repair, after);
  return 0;
}
