// A process killed with SIGKILL in the middle of a write-heavy run must leave
// an image that at most leaks clusters (qemu-img check exit 0 or 3); with
// lazy refcounts the image is dirty and the next read-write open repairs it.
// The data acknowledged by the last completed flush reads back intact.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "tests/testutil.h"

namespace uqcow::testing {
namespace {

// Starts `uqcow bench` writing to `image`, lets it run for `ms`, kills it.
void kill_mid_write(const std::string& image, const std::vector<std::string>& extra, int ms) {
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    std::vector<std::string> args = {uqcow_binary(), "bench", "--rw", "randwrite", "--bs", "4k",
                                     "--depth", "32", "--runtime", "30", "--flush-interval", "64",
                                     "--output", "json"};
    args.insert(args.end(), extra.begin(), extra.end());
    args.push_back(image);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    freopen("/dev/null", "w", stdout);
    execv(argv[0], argv.data());
    _exit(127);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status)) << "the writer ended before it was killed";
}

class CrashTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!require_tool("qemu-img")) return;
    ASSERT_FALSE(uqcow_binary().empty()) << "UQCOW is not set";
  }
};

TEST_P(CrashTest, KillDuringWritesLeavesAtMostLeaks) {
  TempDir dir;
  const std::string img = dir.file("crash.qcow2");
  // Known data first, flushed by a clean exit; the crash run overwrites the
  // second half of the disk only.
  ASSERT_TRUE(Succeeded(run_uqcow({"create", "-q", "-f", "qcow2", "-o", GetParam(), img, "256M"})));
  ASSERT_TRUE(Succeeded(run_command({"qemu-io", "-c", "write -P 0x5c 0 8M", img})));
  for (int ms : {300, 700, 1500}) {
    kill_mid_write(img, {"--offset", "128M"}, ms);
    ASSERT_TRUE(wait_unlocked(img)) << "the killed writer's image locks are still held";
    auto check = run_command({"qemu-img", "check", img});
    bool lazy = GetParam().find("lazy_refcounts=on") != std::string::npos;
    if (!lazy) {
      EXPECT_TRUE(check.exit_code == 0 || check.exit_code == 3) << "after a kill at " << ms << " ms:\n"
                                                                 << check.describe();
    }
    // Opening read-write repairs a dirty (lazy refcounts) image; any image
    // must then be clean or leak-only, and stay readable.
    ASSERT_TRUE(Succeeded(run_uqcow({"bench", "--rw", "randwrite", "--count", "1", "--offset", "200M", img})));
    check = run_command({"qemu-img", "check", img});
    EXPECT_TRUE(check.exit_code == 0 || check.exit_code == 3) << check.describe();
    if (lazy) {
      EXPECT_EQ(check.exit_code, 0) << "the repair on open should leave no leaks:\n" << check.describe();
    }
    EXPECT_TRUE(Succeeded(run_command({"qemu-io", "-r", "-c", "read -P 0x5c 0 8M", img})));
    auto info = run_command({"qemu-img", "info", "--output=json", img});
    EXPECT_EQ(info.out.find("\"dirty-flag\": true"), std::string::npos) << info.out;
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, CrashTest,
                         ::testing::Values("cluster_size=64k", "cluster_size=4k,refcount_bits=8",
                                           "lazy_refcounts=on", "extended_l2=on"));

}  // namespace
}  // namespace uqcow::testing
