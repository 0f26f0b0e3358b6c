// Image locking compatible with QEMU's file-posix driver (block/file-posix.c,
// raw_apply_lock_bytes / raw_check_lock_bytes).
//
// QEMU describes what an open does with a file as two sets of block
// permissions: those it uses (`perm`) and those it lets other users have
// (`shared`). It publishes both as open-file-description (OFD) read locks on
// single bytes: byte 100 + i for each permission bit i it uses, byte 200 + i
// for each bit it does NOT share. A new open then tests, with F_OFD_GETLK,
// that nobody else holds the "not shared" byte of a permission it wants, nor
// the "used" byte of a permission it will not share. Because every lock is a
// read lock, holders never block each other's locking; only the test
// decides. OFD locks belong to the open file description: they go away when
// its last descriptor closes, including when the process is killed, and two
// opens of one file in the same process conflict exactly as two processes do.
#pragma once

#include <cstdint>
#include <string>

#include "engine/result.h"

namespace uqcow {

// QEMU's block permissions (BLK_PERM_*, include/block/block-common.h). The
// bit number is the offset of the permission's lock byte from the base.
enum BlockPerm : uint64_t {
  kPermConsistentRead = 0x01,
  kPermWrite = 0x02,
  kPermWriteUnchanged = 0x04,
  kPermResize = 0x08,
  kPermAll = 0x0f,
};

// What one open of a file holds and what it lets others hold.
struct LockPerms {
  uint64_t perm = 0;           // permissions this open uses
  uint64_t shared = kPermAll;  // permissions other opens may use
  bool operator==(const LockPerms&) const = default;
};

// QEMU's raw_co_create(): creating a file writes and sets its size, and
// nobody else may resize it meanwhile.
inline constexpr LockPerms kCreateLockPerms{kPermWrite | kPermResize, kPermAll & ~kPermResize};

// The names QEMU's bdrv_perm_names() gives, comma-separated ("write",
// "consistent read, resize").
std::string block_perm_names(uint64_t perm);

// Takes QEMU's locks for `perms` on `fd` (a fresh open file description of
// `path`) and checks that no other open file description conflicts.
// Returns OK with the locks held until the description is closed; EAGAIN
// with QEMU's message (`Failed to get "write" lock` or `Failed to get
// shared "write" lock`, then "\nIs another process using the image
// [PATH]?") when another open conflicts; -errno "Failed to lock byte N"
// when the kernel refuses the lock itself. On failure nothing stays locked.
Status lock_file(int fd, const std::string& path, LockPerms perms);

// Releases every lock lock_file() may have taken on `fd`.
void unlock_file(int fd);

}  // namespace uqcow
