#include "uring/file_lock.h"

#include <fcntl.h>

#include <cerrno>

namespace uqcow {
namespace {

// QEMU's lock byte bases. Libvirt takes byte 0; QEMU leaves room above it.
constexpr int kPermBase = 100;
constexpr int kSharedBase = 200;
constexpr int kPermBits = 4;  // BLK_PERM_ALL has four bits in QEMU 7.2

// One-byte OFD lock operation. Returns 0 or -errno.
int set_lock(int fd, int byte, short type) {
  struct flock fl {};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  int r;
  do {
    r = fcntl(fd, F_OFD_SETLK, &fl);
  } while (r != 0 && errno == EINTR);
  return r == 0 ? 0 : -errno;
}

// QEMU's qemu_lock_fd_test(fd, byte, 1, exclusive=true): would a write lock
// on `byte` conflict with another open file description's lock? Returns 0
// (free), -EAGAIN (held elsewhere) or -errno.
int test_lock(int fd, int byte) {
  struct flock fl {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  if (fcntl(fd, F_OFD_GETLK, &fl) != 0) return -errno;
  return fl.l_type == F_UNLCK ? 0 : -EAGAIN;
}

// QEMU's raw_lock_error_setg_errno: a lock held elsewhere is reported
// without an errno text, anything else with it.
Error lock_error(int neg_errno, const std::string& message) {
  int err = -neg_errno;
  if (err == EAGAIN || err == EACCES) return Error(EAGAIN, message);
  return errno_error(err, message);
}

// raw_apply_lock_bytes(): one read lock per used permission and per
// permission not shared.
Status apply_lock_bytes(int fd, LockPerms perms) {
  for (int base : {kPermBase, kSharedBase}) {
    uint64_t bits = base == kPermBase ? perms.perm : ~perms.shared;
    for (int i = 0; i < kPermBits; ++i) {
      if (!(bits & (uint64_t{1} << i))) continue;
      if (int r = set_lock(fd, base + i, F_RDLCK); r != 0) {
        return lock_error(r, "Failed to lock byte " + std::to_string(base + i));
      }
    }
  }
  return Status();
}

// raw_check_lock_bytes(), in QEMU's order: first the permissions this open
// wants against others' "not shared" bytes, then the permissions it does not
// share against others' "used" bytes.
Status check_lock_bytes(int fd, LockPerms perms) {
  for (int i = 0; i < kPermBits; ++i) {
    uint64_t bit = uint64_t{1} << i;
    if (!(perms.perm & bit)) continue;
    if (int r = test_lock(fd, kSharedBase + i); r != 0) {
      return lock_error(r, "Failed to get \"" + block_perm_names(bit) + "\" lock");
    }
  }
  for (int i = 0; i < kPermBits; ++i) {
    uint64_t bit = uint64_t{1} << i;
    if (perms.shared & bit) continue;
    if (int r = test_lock(fd, kPermBase + i); r != 0) {
      return lock_error(r, "Failed to get shared \"" + block_perm_names(bit) + "\" lock");
    }
  }
  return Status();
}

}  // namespace

std::string block_perm_names(uint64_t perm) {
  static constexpr struct {
    uint64_t perm;
    const char* name;
  } kNames[] = {
      {kPermConsistentRead, "consistent read"},
      {kPermWrite, "write"},
      {kPermWriteUnchanged, "write unchanged"},
      {kPermResize, "resize"},
  };
  std::string out;
  for (const auto& n : kNames) {
    if (!(perm & n.perm)) continue;
    if (!out.empty()) out += ", ";
    out += n.name;
  }
  return out;
}

Status lock_file(int fd, const std::string& path, LockPerms perms) {
  // As QEMU's RAW_PL_PREPARE: lock first, then test, so that of two opens
  // racing for conflicting permissions at least one sees the other.
  Status s = apply_lock_bytes(fd, perms);
  if (s.ok()) {
    s = check_lock_bytes(fd, perms);
    if (!s.ok()) {
      s = Error(s.code(), s.message() + "\nIs another process using the image [" + path + "]?");
    }
  }
  if (!s.ok()) unlock_file(fd);
  return s;
}

void unlock_file(int fd) {
  // Unlocking a byte that is not locked is not an error; only a broken
  // descriptor could fail here, and then its locks are gone anyway.
  for (int i = 0; i < kPermBits; ++i) {
    (void)set_lock(fd, kPermBase + i, F_UNLCK);
    (void)set_lock(fd, kSharedBase + i, F_UNLCK);
  }
}

}  // namespace uqcow
