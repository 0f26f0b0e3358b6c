// Deterministic simulation of concurrent requests on one qcow2 image, over
// every layout (issue 12). See README.md in this folder for what a seed
// does and what the oracle allows.
//
// Environment (bazel test --test_env=...):
//   UQCOW_SIM_SEED=N       run only seed N (with UQCOW_SIM_LAYOUT: replay one)
//   UQCOW_SIM_LAYOUT=NAME  run only this layout (the others are skipped)
//   UQCOW_SIM_SEEDS=N      seeds per layout (default kDefaultSeeds, for CI)
//   UQCOW_SIM_FIRST_SEED=N first seed of the range (default 1)
//   UQCOW_SIM_BATCHES=N    batches per seed (default 5)
//   UQCOW_SIM_MAX_DEPTH=N  most ops in flight (1: sequential)
//   UQCOW_SIM_SLOW=1       also qemu-img check after every batch, and
//                          qemu-img convert of every snapshot at the end
// Every third seed (seed % 3 == 2) is a crash seed.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "tests/sim/driver.h"
#include "tests/sim/layouts.h"

namespace uqcow::sim {
namespace {

constexpr uint64_t kDefaultSeeds = 16;
constexpr size_t kFullReports = 2;  // failures printed in full per test

std::optional<uint64_t> env_number(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::strtoull(v, nullptr, 0);
}

// What every layout explored, for the summary line at the end.
struct Totals {
  uint64_t seeds = 0, failed = 0, ops = 0, completions = 0, decisions = 0, crashes = 0;
};
Totals& totals() {
  static Totals t;
  return t;
}

class PrintTotals : public ::testing::Environment {
 public:
  void TearDown() override {
    const Totals& t = totals();
    if (t.seeds == 0) return;
    std::printf("sim total: %llu seeds (%llu failed), %llu ops, %llu device requests, %llu scheduler decisions, "
                "%llu crash images\n",
                static_cast<unsigned long long>(t.seeds), static_cast<unsigned long long>(t.failed),
                static_cast<unsigned long long>(t.ops), static_cast<unsigned long long>(t.completions),
                static_cast<unsigned long long>(t.decisions), static_cast<unsigned long long>(t.crashes));
  }
};
const auto* const kPrintTotals = ::testing::AddGlobalTestEnvironment(new PrintTotals);

// Each layout's seeds run as two tests (odd and even seeds), so that shards
// share the slow layouts (2 MiB clusters, LUKS).
constexpr uint64_t kParts = 2;
struct Part {
  Layout layout;
  uint64_t part = 0;
};
void PrintTo(const Part& p, std::ostream* os) { *os << p.layout.name << " part " << p.part; }

std::vector<Part> all_parts() {
  std::vector<Part> parts;
  for (const Layout& l : all_layouts()) {
    for (uint64_t p = 0; p < kParts; ++p) parts.push_back({l, p});
  }
  return parts;
}

class SimTest : public ::testing::TestWithParam<Part> {};

TEST_P(SimTest, SeedsOverLayout) {
  const Layout& layout = GetParam().layout;
  if (const char* only = std::getenv("UQCOW_SIM_LAYOUT"); only && *only && layout.name != only) {
    GTEST_SKIP() << "UQCOW_SIM_LAYOUT=" << only << " selects another layout";
  }
  const LayoutImages& images = layout_images(layout);
  if (!images.missing_tool.empty()) GTEST_SKIP() << images.error;
  ASSERT_TRUE(images.error.empty()) << images.error << "\nscript:\n" << images.script;

  std::vector<uint64_t> seeds;
  if (auto one = env_number("UQCOW_SIM_SEED")) {
    seeds.push_back(*one);
  } else {
    const uint64_t first = env_number("UQCOW_SIM_FIRST_SEED").value_or(1);
    const uint64_t count = env_number("UQCOW_SIM_SEEDS").value_or(kDefaultSeeds);
    for (uint64_t s = first; s < first + count; ++s) seeds.push_back(s);
  }
  std::erase_if(seeds, [&](uint64_t s) { return s % kParts != GetParam().part; });
  if (seeds.empty()) GTEST_SKIP() << "no seed of this part is selected";
  SeedOptions options;
  options.slow = env_number("UQCOW_SIM_SLOW").value_or(0) != 0;
  options.max_depth = env_number("UQCOW_SIM_MAX_DEPTH").value_or(options.max_depth);
  options.batches = std::max<uint64_t>(1, env_number("UQCOW_SIM_BATCHES").value_or(options.batches));

  uint64_t ops = 0, decisions = 0, completions = 0, crashes = 0, torn = 0, copied = 0, bitmaps = 0, consistent = 0;
  std::vector<uint64_t> failed;
  for (uint64_t seed : seeds) {
    options.crash = seed % 3 == 2;
    SeedReport r = run_seed(layout, images, seed, options);
    ops += r.ops;
    decisions += r.decisions;
    completions += r.completions;
    crashes += r.crashed;
    torn += r.crash_stats.torn;
    copied += r.crash_copied_window;
    bitmaps += r.bitmap;
    consistent += r.crash_bitmaps_consistent;
    Totals& t = totals();
    ++t.seeds;
    t.failed += r.failed;
    t.ops += r.ops;
    t.completions += r.completions;
    t.decisions += r.decisions;
    t.crashes += r.crashed;
    if (!r.failed) continue;
    failed.push_back(seed);
    if (failed.size() <= kFullReports) {
      ADD_FAILURE() << r.failure;
    } else {
      ADD_FAILURE() << r.failure.substr(0, r.failure.find("\nops of the batch")) << "\n(trace left out)";
    }
  }
  std::string failed_list;
  for (uint64_t s : failed) failed_list += " " + std::to_string(s);
  std::printf("sim %s (%s seeds): %zu seeds, %zu failed%s%s; %llu ops, %llu device requests, %llu scheduler decisions; "
              "%llu crash images (%llu torn writes, %llu in a snapshot's OFLAG_COPIED window); %llu with a dirty bitmap (%llu crash images found it stored clean)\n",
              layout.name.c_str(), GetParam().part % 2 ? "odd" : "even", seeds.size(), failed.size(), failed.empty() ? "" : ":", failed_list.c_str(),
              static_cast<unsigned long long>(ops), static_cast<unsigned long long>(completions),
              static_cast<unsigned long long>(decisions), static_cast<unsigned long long>(crashes),
              static_cast<unsigned long long>(torn), static_cast<unsigned long long>(copied),
              static_cast<unsigned long long>(bitmaps), static_cast<unsigned long long>(consistent));
}

// A seed replays exactly: the same ops, the same completion order, the same
// outcome (pass, or the same failure).
TEST(SimDeterminism, SameSeedSameRun) {
  const Layout& layout = all_layouts().front();
  const LayoutImages& images = layout_images(layout);
  if (!images.missing_tool.empty()) GTEST_SKIP() << images.error;
  ASSERT_TRUE(images.error.empty()) << images.error;
  for (uint64_t seed : {1, 2}) {
    SeedOptions options;
    options.crash = seed == 2;
    const SeedReport a = run_seed(layout, images, seed, options);
    const SeedReport b = run_seed(layout, images, seed, options);
    EXPECT_GT(a.completions, 0u);
    EXPECT_EQ(a.order_hash, b.order_hash) << "seed " << seed;
    EXPECT_EQ(a.completions, b.completions) << "seed " << seed;
    EXPECT_EQ(a.ops, b.ops) << "seed " << seed;
    EXPECT_EQ(a.failure, b.failure) << "seed " << seed;
    EXPECT_EQ(a.crash_stats.applied, b.crash_stats.applied) << "seed " << seed;
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, SimTest, ::testing::ValuesIn(all_parts()),
                         [](const ::testing::TestParamInfo<Part>& info) {
                           return info.param.layout.name + (info.param.part % 2 ? "_odd_seeds" : "_even_seeds");
                         });

}  // namespace
}  // namespace uqcow::sim
