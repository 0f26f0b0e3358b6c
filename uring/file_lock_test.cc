// Tests of QEMU-compatible image locking (uring/file_lock.h) between open
// file descriptions of one process, which conflict exactly as two processes
// do. Which bytes are held is read back with F_OFD_GETLK on an unlocked
// descriptor, independent of the code under test. The interoperability with
// QEMU's own tools is tests/lock_test.cc.
#include "uring/file_lock.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <set>
#include <string>

#include "uring/raw_file.h"

namespace uqcow {
namespace {

constexpr LockPerms kReadWrite{kPermConsistentRead | kPermWrite | kPermResize,
                               kPermConsistentRead | kPermWriteUnchanged};
constexpr LockPerms kReadOnly{kPermConsistentRead, kPermConsistentRead | kPermWriteUnchanged};
constexpr LockPerms kForceShare{kPermConsistentRead, kPermAll};

class FileLockTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* dir = std::getenv("TEST_TMPDIR");
    path_ = std::string(dir && *dir ? dir : "/tmp") + "/lock.img";
    int fd = ::open(path_.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0644);
    ASSERT_GE(fd, 0);
    ::close(fd);
  }

  // A new open file description with `perms` locked.
  Result<std::unique_ptr<RawFile>> open(LockPerms perms) {
    return RawFile::open(path_, RawFileOptions{.read_only = true, .lock = perms});
  }

  // The bytes in 0..299 some open file description holds a lock on.
  std::set<int> held_bytes() {
    int fd = ::open(path_.c_str(), O_RDONLY);
    std::set<int> held;
    for (int b = 0; b < 300; ++b) {
      struct flock fl {};
      fl.l_type = F_WRLCK;
      fl.l_whence = SEEK_SET;
      fl.l_start = b;
      fl.l_len = 1;
      EXPECT_EQ(fcntl(fd, F_OFD_GETLK, &fl), 0);
      if (fl.l_type != F_UNLCK) held.insert(b);
    }
    ::close(fd);
    return held;
  }

  std::string path_;
};

// The bytes of QEMU 7.2's read-write and read-only qcow2 opens
// (strace of qemu-io; see tests/lock_test.cc for the live comparison).
TEST_F(FileLockTest, LocksQemusBytes) {
  {
    auto rw = open(kReadWrite);
    ASSERT_TRUE(rw.ok()) << rw.error().message();
    EXPECT_EQ(held_bytes(), (std::set<int>{100, 101, 103, 201, 203}));
  }
  EXPECT_TRUE(held_bytes().empty()) << "closing the file releases its locks";
  {
    auto ro = open(kReadOnly);
    ASSERT_TRUE(ro.ok()) << ro.error().message();
    EXPECT_EQ(held_bytes(), (std::set<int>{100, 201, 203}));
  }
  {
    auto shared = open(kForceShare);
    ASSERT_TRUE(shared.ok()) << shared.error().message();
    EXPECT_EQ(held_bytes(), (std::set<int>{100}));
  }
  {
    auto created = open(kCreateLockPerms);
    ASSERT_TRUE(created.ok()) << created.error().message();
    EXPECT_EQ(held_bytes(), (std::set<int>{101, 103, 203}));
  }
}

TEST_F(FileLockTest, WriterExcludesWritersAndReaders) {
  auto rw = open(kReadWrite);
  ASSERT_TRUE(rw.ok()) << rw.error().message();
  auto second = open(kReadWrite);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.error().code(), EAGAIN);
  EXPECT_EQ(second.error().message(),
            "Failed to get \"write\" lock\nIs another process using the image [" + path_ + "]?");
  auto reader = open(kReadOnly);
  ASSERT_FALSE(reader.ok());
  EXPECT_EQ(reader.error().message(),
            "Failed to get shared \"write\" lock\nIs another process using the image [" + path_ + "]?");
  auto shared = open(kForceShare);
  EXPECT_TRUE(shared.ok()) << "force-share reads beside a writer: " << shared.error().message();
  // The refused opens left nothing behind.
  EXPECT_EQ(held_bytes(), (std::set<int>{100, 101, 103, 201, 203}));
}

TEST_F(FileLockTest, ReadersShareAndExcludeWriters) {
  auto a = open(kReadOnly);
  auto b = open(kReadOnly);
  ASSERT_TRUE(a.ok()) << a.error().message();
  ASSERT_TRUE(b.ok()) << b.error().message();
  auto writer = open(kReadWrite);
  ASSERT_FALSE(writer.ok());
  EXPECT_EQ(writer.error().message(),
            "Failed to get \"write\" lock\nIs another process using the image [" + path_ + "]?");
  a->reset();
  b->reset();
  auto after = open(kReadWrite);
  EXPECT_TRUE(after.ok()) << "the readers closed: " << after.error().message();
}

TEST_F(FileLockTest, PermNamesAreQemus) {
  EXPECT_EQ(block_perm_names(kPermWrite), "write");
  EXPECT_EQ(block_perm_names(kPermConsistentRead | kPermResize), "consistent read, resize");
  EXPECT_EQ(block_perm_names(kPermWriteUnchanged), "write unchanged");
}

}  // namespace
}  // namespace uqcow
