// Ring setup over every combination of setup flags (as liburing's own tests
// run each case over every ring setup), and the fallback under injected
// rejections. The oracle for what the running kernel accepts is a plain
// io_uring_queue_init_params call; that a ring works is shown by NOPs and a
// read through a Reactor, checked against pwrite(2).
#include "uring/ring_setup.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "engine/sync_wait.h"
#include "engine/task.h"
#include "engine/task_group.h"
#include "uring/ops.h"
#include "uring/reactor.h"

namespace uqcow::uring {
namespace {

constexpr unsigned kEntries = 8;

// The flags whose every combination is tried: the hints and CQSIZE.
std::vector<unsigned> combined_flags() {
  std::vector<unsigned> flags(ring_setup_hints().begin(), ring_setup_hints().end());
  flags.push_back(IORING_SETUP_CQSIZE);
  return flags;
}

unsigned hint_mask() {
  unsigned mask = 0;
  for (unsigned hint : ring_setup_hints()) mask |= hint;
  return mask;
}

std::string flags_name(unsigned flags) {
  struct Named {
    unsigned bit;
    const char* name;
  };
  static const Named kNames[] = {
    {IORING_SETUP_CQSIZE, "CQSIZE"},
    {IORING_SETUP_COOP_TASKRUN, "COOP_TASKRUN"},
#ifdef IORING_SETUP_SINGLE_ISSUER
    {IORING_SETUP_SINGLE_ISSUER, "SINGLE_ISSUER"},
#endif
#ifdef IORING_SETUP_DEFER_TASKRUN
    {IORING_SETUP_DEFER_TASKRUN, "DEFER_TASKRUN"},
#endif
  };
  std::string out;
  for (const Named& n : kNames) {
    if (!(flags & n.bit)) continue;
    if (!out.empty()) out += "|";
    out += n.name;
    flags &= ~n.bit;
  }
  if (flags != 0) out += (out.empty() ? "" : "|") + std::to_string(flags);
  return out.empty() ? "0" : out;
}

std::vector<std::string> flags_names(const std::vector<unsigned>& words) {
  std::vector<std::string> out;
  for (unsigned w : words) out.push_back(flags_name(w));
  return out;
}

// Every subset of combined_flags().
std::vector<unsigned> every_combination() {
  std::vector<unsigned> bits = combined_flags();
  std::vector<unsigned> out;
  for (unsigned subset = 0; subset < (1u << bits.size()); ++subset) {
    unsigned flags = 0;
    for (size_t i = 0; i < bits.size(); ++i) {
      if (subset & (1u << i)) flags |= bits[i];
    }
    out.push_back(flags);
  }
  return out;
}

// 0 or the -errno with which the running kernel refuses a ring with `flags`.
int kernel_verdict(unsigned flags) {
  io_uring ring{};
  io_uring_params params{};
  params.flags = flags;
  if (flags & IORING_SETUP_CQSIZE) params.cq_entries = 2 * kEntries;
  int ret = io_uring_queue_init_params(kEntries, &ring, &params);
  if (ret == 0) io_uring_queue_exit(&ring);
  return ret;
}

// Counts NOPs that complete with 0; more of them than the SQ holds, so some
// wait on the reactor's pending list.
Task<void> nops(int count, int* ok) {
  TaskGroup group;
  auto one = [](int* ok) -> Task<void> {
    if (co_await uring::nop() == 0) ++*ok;
  };
  for (int i = 0; i < count; ++i) group.spawn(one(ok));
  co_await group.join();
}

Task<int> read_at(int fd, void* buf, size_t len, uint64_t offset) {
  co_return co_await uring::read(fd, buf, len, offset);
}

// The ring behind `reactor` carries I/O: NOPs complete, and a read returns
// what pwrite(2) put in a file.
::testing::AssertionResult RingWorks(Reactor& reactor) {
  constexpr int kNops = 4 * kEntries + 3;
  int ok = 0;
  sync_wait(reactor, nops(kNops, &ok));
  if (ok != kNops) return ::testing::AssertionFailure() << ok << " of " << kNops << " NOPs completed with 0";

  const char* dir = std::getenv("TEST_TMPDIR");
  std::string path = std::string(dir && *dir ? dir : "/tmp") + "/ring_setup_XXXXXX";
  int fd = ::mkstemp(path.data());
  if (fd < 0) return ::testing::AssertionFailure() << "mkstemp " << path << ": " << std::strerror(errno);
  ::unlink(path.c_str());
  std::vector<std::byte> want(5000);
  for (size_t i = 0; i < want.size(); ++i) want[i] = static_cast<std::byte>(i * 7 + 1);
  bool written = ::pwrite(fd, want.data(), want.size(), 1000) == static_cast<ssize_t>(want.size());
  std::vector<std::byte> got(want.size());
  int r = written ? sync_wait(reactor, read_at(fd, got.data(), got.size(), 1000)) : -EIO;
  ::close(fd);
  if (!written) return ::testing::AssertionFailure() << "pwrite of the test file failed";
  if (r != 0) return ::testing::AssertionFailure() << "read through the ring: " << std::strerror(-r);
  if (got != want) return ::testing::AssertionFailure() << "read through the ring returned other bytes";
  return ::testing::AssertionSuccess();
}

// A setup hook that rejects with `error` every attempt holding a bit of
// `reject`, passes the others to the kernel, and records every attempt.
struct InjectedSetup {
  unsigned reject = 0;
  int error = -EINVAL;
  std::vector<unsigned> seen;

  RingSetupFn fn() {
    return [this](unsigned entries, io_uring* ring, io_uring_params* params) {
      seen.push_back(params->flags);
      if (params->flags & reject) return error;
      return io_uring_queue_init_params(entries, ring, params);
    };
  }
};

TEST(RingSetupAttempts, DropOneHintAtATimeAndKeepEveryOtherFlag) {
  const unsigned hints = hint_mask();
  for (unsigned wanted : every_combination()) {
    SCOPED_TRACE("wanted " + flags_name(wanted));
    std::vector<unsigned> attempts = ring_setup_attempts(wanted);
    ASSERT_FALSE(attempts.empty());
    EXPECT_EQ(attempts.front(), wanted);
    EXPECT_EQ(attempts.back(), wanted & ~hints);
    EXPECT_EQ(attempts.size(), 1u + std::popcount(wanted & hints));
    for (size_t i = 1; i < attempts.size(); ++i) {
      unsigned dropped = attempts[i - 1] & ~attempts[i];
      EXPECT_EQ(attempts[i] & ~attempts[i - 1], 0u) << "attempt " << i << " adds a flag";
      EXPECT_EQ(std::popcount(dropped), 1) << "attempt " << i << " drops " << flags_name(dropped);
      EXPECT_TRUE(dropped & hints) << "attempt " << i << " drops " << flags_name(dropped) << ", not a hint";
      // The hint dropped is the first (newest-kernel) one still present.
      for (unsigned hint : ring_setup_hints()) {
        if (attempts[i - 1] & hint) {
          EXPECT_EQ(dropped, hint) << "attempt " << i;
          break;
        }
      }
    }
  }
}

TEST(RingSetupAttempts, DefaultAsksForCqsizeAndTheOneThreadHints) {
  unsigned flags = default_ring_setup_flags();
  EXPECT_TRUE(flags & IORING_SETUP_CQSIZE);
  EXPECT_TRUE(flags & IORING_SETUP_COOP_TASKRUN);
#ifdef IORING_SETUP_SINGLE_ISSUER
  EXPECT_TRUE(flags & IORING_SETUP_SINGLE_ISSUER);
#endif
  EXPECT_EQ(ReactorOptions{}.setup_flags, flags);
}

// Every combination ends in the first attempt the running kernel accepts (no
// fallback further than needed), and that ring works. On a kernel that knows
// every flag the only fallback is DEFER_TASKRUN without SINGLE_ISSUER, which
// the kernel refuses.
TEST(ReactorSetup, EveryFlagCombinationGivesTheFirstAcceptedAttemptAndAWorkingRing) {
  for (unsigned wanted : every_combination()) {
    SCOPED_TRACE("wanted " + flags_name(wanted));
    int verdict = -EINVAL;
    unsigned expected = 0;
    for (unsigned attempt : ring_setup_attempts(wanted)) {
      verdict = kernel_verdict(attempt);
      expected = attempt;
      if (verdict != -EINVAL) break;
    }
    if (verdict == -EPERM || verdict == -ENOSYS) {
      GTEST_SKIP() << "io_uring is not available: " << std::strerror(-verdict);
    }
    ASSERT_EQ(verdict, 0) << "the kernel refuses even " << flags_name(expected) << ": " << std::strerror(-verdict);

    auto reactor = Reactor::create(ReactorOptions{.entries = kEntries, .setup_flags = wanted});
    ASSERT_TRUE(reactor.ok()) << reactor.error().message();
    EXPECT_EQ(flags_name((*reactor)->ring()->flags), flags_name(expected));
    if (expected & IORING_SETUP_CQSIZE) {
      EXPECT_EQ((*reactor)->ring()->cq.ring_entries, 2 * kEntries) << "the CQ is twice the SQ";
    }
    EXPECT_TRUE(RingWorks(**reactor));
  }
}

// A rejection of one hint, injected, costs exactly that hint (and those
// dropped before it); the reactor on the ring that is left works.
TEST(ReactorSetup, InjectedRejectionOfAHintFallsBackToTheNextAttempt) {
  const unsigned wanted = hint_mask() | IORING_SETUP_CQSIZE;
  const std::vector<unsigned> attempts = ring_setup_attempts(wanted);
  for (unsigned hint : ring_setup_hints()) {
    SCOPED_TRACE("rejecting " + flags_name(hint));
    auto first_without = std::find_if(attempts.begin(), attempts.end(), [&](unsigned a) { return !(a & hint); });
    ASSERT_NE(first_without, attempts.end());
    if (kernel_verdict(*first_without) != 0) {
      GTEST_SKIP() << "the kernel refuses " << flags_name(*first_without) << " without an injection";
    }
    InjectedSetup injected{.reject = hint};
    auto reactor = Reactor::create(ReactorOptions{.entries = kEntries, .setup_flags = wanted, .setup = injected.fn()});
    ASSERT_TRUE(reactor.ok()) << reactor.error().message();
    EXPECT_EQ(flags_names(injected.seen), flags_names(std::vector<unsigned>(attempts.begin(), first_without + 1)));
    EXPECT_EQ(flags_name((*reactor)->ring()->flags), flags_name(*first_without));
    EXPECT_TRUE(RingWorks(**reactor));
  }
}

// CQSIZE is not a hint: refused in every attempt, the setup fails after the
// last attempt with the kernel's EINVAL, and leaves the thread without a
// reactor (a later create succeeds).
TEST(ReactorSetup, RejectionOfEveryAttemptIsReturnedAfterTheLast) {
  const unsigned wanted = default_ring_setup_flags();
  InjectedSetup injected{.reject = IORING_SETUP_CQSIZE};
  auto reactor = Reactor::create(ReactorOptions{.entries = kEntries, .setup_flags = wanted, .setup = injected.fn()});
  ASSERT_FALSE(reactor.ok());
  EXPECT_EQ(reactor.error().code(), EINVAL);
  EXPECT_NE(reactor.error().message().find("io_uring_queue_init"), std::string::npos) << reactor.error().message();
  EXPECT_EQ(flags_names(injected.seen), flags_names(ring_setup_attempts(wanted)));
  EXPECT_FALSE(Reactor::has_current());

  auto plain = Reactor::create(ReactorOptions{.entries = kEntries});
  ASSERT_TRUE(plain.ok()) << plain.error().message();
  EXPECT_TRUE(RingWorks(**plain));
}

// An error that is not about the flags is returned from the first attempt,
// not retried with fewer flags.
TEST(ReactorSetup, NonEinvalErrorIsReturnedAtOnceNamingTheCall) {
  for (int error : {ENOMEM, EMFILE, EPERM}) {
    SCOPED_TRACE(std::strerror(error));
    InjectedSetup injected{.reject = ~0u, .error = -error};
    auto reactor = Reactor::create(ReactorOptions{.entries = kEntries, .setup = injected.fn()});
    ASSERT_FALSE(reactor.ok());
    EXPECT_EQ(reactor.error().code(), error);
    EXPECT_NE(reactor.error().message().find("io_uring_queue_init"), std::string::npos) << reactor.error().message();
    EXPECT_EQ(flags_names(injected.seen), flags_names({default_ring_setup_flags()})) << "retried";
    EXPECT_FALSE(Reactor::has_current());
  }
}

}  // namespace
}  // namespace uqcow::uring
