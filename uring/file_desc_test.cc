// FileDesc owns exactly one descriptor: closed by the destructor, by reset()
// and by a move assignment over it; moved or released, never closed twice.
// Whether a descriptor is open is asked of the kernel (fcntl F_GETFD).
#include "uring/file_desc.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <utility>

namespace uqcow {
namespace {

bool is_open(int fd) { return ::fcntl(fd, F_GETFD) != -1 || errno != EBADF; }

int open_null() {
  int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  EXPECT_GE(fd, 0);
  return fd;
}

TEST(FileDescTest, DestructorCloses) {
  int raw = open_null();
  {
    FileDesc fd(raw);
    EXPECT_TRUE(fd.valid());
    EXPECT_EQ(fd.get(), raw);
    EXPECT_TRUE(is_open(raw));
  }
  EXPECT_FALSE(is_open(raw));
}

TEST(FileDescTest, EmptyAndNegativeHoldNothing) {
  FileDesc none;
  EXPECT_FALSE(none.valid());
  EXPECT_EQ(none.get(), -1);
  FileDesc failed(-1);  // what ::open returns on failure
  EXPECT_FALSE(failed.valid());
}

TEST(FileDescTest, MoveTransfersOwnership) {
  int raw = open_null();
  FileDesc a(raw);
  FileDesc b(std::move(a));
  EXPECT_FALSE(a.valid());  // NOLINT(bugprone-use-after-move): the contract
  EXPECT_EQ(b.get(), raw);
  { FileDesc c(std::move(b)); }
  EXPECT_FALSE(is_open(raw));
}

TEST(FileDescTest, MoveAssignmentClosesTheOldDescriptor) {
  int first = open_null();
  int second = open_null();
  FileDesc a(first);
  FileDesc b(second);
  a = std::move(b);
  EXPECT_FALSE(is_open(first));
  EXPECT_TRUE(is_open(second));
  EXPECT_EQ(a.get(), second);
  EXPECT_FALSE(b.valid());  // NOLINT(bugprone-use-after-move)
  a = std::move(a);         // self-move keeps the descriptor
  EXPECT_TRUE(is_open(second));
}

TEST(FileDescTest, ReleaseGivesUpOwnershipAndResetCloses) {
  int raw = open_null();
  int kept;
  {
    FileDesc fd(raw);
    kept = fd.release();
    EXPECT_FALSE(fd.valid());
  }
  EXPECT_EQ(kept, raw);
  EXPECT_TRUE(is_open(raw));
  FileDesc fd(raw);
  int other = open_null();
  fd.reset(other);
  EXPECT_FALSE(is_open(raw));
  EXPECT_EQ(fd.get(), other);
  fd.reset();
  EXPECT_FALSE(is_open(other));
  EXPECT_FALSE(fd.valid());
}

}  // namespace
}  // namespace uqcow
