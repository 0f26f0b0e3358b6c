// `uqcow bench --jobs N`: N reactor threads, one ring each, in one process.
// The run verifies its own writes (--verify); the images are then checked by
// qemu-img. This is the multi-threaded code that .ci/run also runs under
// ThreadSanitizer (--config=tsan).
#include <gtest/gtest.h>

#include <string>

#include "tests/testutil.h"

namespace uqcow::testing {
namespace {

class MultiReactor : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!require_tool("qemu-img")) return;
    ASSERT_FALSE(uqcow_binary().empty()) << "UQCOW is not set";
  }
  // A number of the JSON output's "verify" member, or -1 if it is missing.
  static long verify_field(const std::string& json, const std::string& field) {
    auto at = json.find("\"verify\": {");
    if (at == std::string::npos) return -1;
    at = json.find("\"" + field + "\": ", at);
    return at == std::string::npos ? -1 : std::stol(json.substr(at + field.size() + 4));
  }
  TempDir dir_{"multi_reactor"};
};

TEST_F(MultiReactor, JobsOnTheirOwnQcow2ImagesVerifyTheirWrites) {
  for (const char* name : {"a.qcow2", "b.qcow2", "c.qcow2"}) {
    ASSERT_TRUE(Succeeded(run_command({"qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k",
                                       dir_.file(name), "32M"})));
  }
  CommandResult r = run_uqcow({"bench", "--jobs", "3", "--rw", "randrw", "--bs", "4k", "--depth", "16", "--count",
                               "3000", "--verify", "--l2-cache-size", "16k", "--output", "json", dir_.file("a.qcow2"),
                               dir_.file("b.qcow2"), dir_.file("c.qcow2")});
  ASSERT_TRUE(Succeeded(r));
  EXPECT_GT(verify_field(r.out, "blocks"), 0) << r.out;
  EXPECT_EQ(verify_field(r.out, "errors"), 0) << r.out;
  for (const char* name : {"a.qcow2", "b.qcow2", "c.qcow2"}) {
    EXPECT_TRUE(Succeeded(run_command({"qemu-img", "check", dir_.file(name)})));
  }
}

TEST_F(MultiReactor, JobsOnSlicesOfOneRawFile) {
  ASSERT_TRUE(Succeeded(run_command({"qemu-img", "create", "-q", "-f", "raw", dir_.file("r.raw"), "16M"})));
  CommandResult r = run_uqcow({"bench", "--jobs", "2", "--rw", "randwrite", "--bs", "4k", "--depth", "8", "--count",
                               "2000", "--verify", "--output", "json", dir_.file("r.raw")});
  ASSERT_TRUE(Succeeded(r));
  EXPECT_GT(verify_field(r.out, "blocks"), 0) << r.out;
  EXPECT_EQ(verify_field(r.out, "errors"), 0) << r.out;
}

TEST_F(MultiReactor, ReadJobsShareOneQcow2Image) {
  const std::string img = dir_.file("shared.qcow2");
  ASSERT_TRUE(Succeeded(run_command({"qemu-img", "create", "-q", "-f", "qcow2", img, "16M"})));
  ASSERT_TRUE(Succeeded(run_command({"qemu-io", "-c", "write -P 0x5a 0 16M", img})));
  CommandResult r = run_uqcow({"bench", "--jobs", "2", "--rw", "randread", "--bs", "4k", "--depth", "8", "--count",
                               "4000", "--output", "json", img});
  ASSERT_TRUE(Succeeded(r));
  EXPECT_TRUE(Succeeded(run_command({"qemu-img", "check", img})));
}

}  // namespace
}  // namespace uqcow::testing
