// The transmission phase. A reader loop receives requests in order and
// spawns one coroutine per request into a TaskGroup; those run concurrently
// on the Disk and reply in whatever order they finish. A CoMutex around the
// socket's send side keeps each reply (all chunks of it) contiguous.
#include <sys/socket.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "engine/co_mutex.h"
#include "engine/co_queue.h"
#include "engine/task_group.h"
#include "nbd/block_status.h"
#include "nbd/protocol.h"
#include "nbd/session.h"
#include "nbd/socket.h"

namespace uqcow::nbd {

uint32_t to_nbd_error(int errno_value) {
  switch (errno_value) {
    case EPERM: case EROFS: return kEperm;
    case ENOMEM: return kEnomem;
    case EINVAL: return kEinval;
    case ENOSPC: case EFBIG: return kEnospc;
    case EOVERFLOW: return kEoverflow;
    case ENOTSUP: return kEnotsup;
    case ESHUTDOWN: return kEshutdown;
    default: return kEio;
  }
}

namespace {

// Requests in flight per client: the reader stops receiving at this count,
// so one client can hold at most this many payload buffers.
constexpr size_t kMaxInFlight = 64;

class Session {
 public:
  Session(int fd, const Export& exp, Negotiated n)
      : fd_(fd), exp_(exp), negotiated_(n), block_status_(exp) {}
  Task<void> run();

 private:
  Task<void> handle(Request req, std::vector<std::byte> payload);
  Task<Status> do_read(const Request& req);
  Task<Status> do_block_status(const Request& req);
  Task<Status> execute(const Request& req, const std::vector<std::byte>& payload);
  Task<Status> prefetch(const Request& req);
  // Sends `len` bytes under the send lock; a failed send shuts the socket
  // down so the reader loop ends too.
  Task<void> send_reply(const std::byte* data, size_t len);
  Task<void> reply_error(const Request& req, uint32_t error, const std::string& message);
  Task<void> reply_ok(const Request& req);
  // 0 or the NBD error for a request whose range or length is invalid.
  uint32_t validate(const Request& req) const;

  int fd_;
  const Export& exp_;
  Negotiated negotiated_;
  BlockStatusResponder block_status_;
  CoMutex send_mutex_;
  TaskGroup requests_;
  CoQueue slot_freed_;
  bool broken_ = false;
};

Task<void> Session::send_reply(const std::byte* data, size_t len) {
  auto guard = co_await send_mutex_.scoped_lock();
  if (broken_) co_return;
  Status s = co_await send_all(fd_, data, len);
  if (!s.ok()) {
    broken_ = true;
    ::shutdown(fd_, SHUT_RDWR);
  }
}

Task<void> Session::reply_error(const Request& req, uint32_t error, const std::string& message) {
  std::vector<std::byte> buf;
  if (negotiated_.structured_replies) {
    buf.resize(ChunkHeader::kSize + 6 + message.size());
    ChunkHeader{kReplyFlagDone, kReplyTypeError, req.handle, static_cast<uint32_t>(6 + message.size())}
        .store(buf.data());
    store_be32(buf.data() + ChunkHeader::kSize, error);
    store_be16(buf.data() + ChunkHeader::kSize + 4, static_cast<uint16_t>(message.size()));
    std::memcpy(buf.data() + ChunkHeader::kSize + 6, message.data(), message.size());
  } else {
    buf.resize(SimpleReply::kSize);
    SimpleReply{error, req.handle}.store(buf.data());
  }
  co_await send_reply(buf.data(), buf.size());
}

Task<void> Session::reply_ok(const Request& req) {
  std::byte buf[SimpleReply::kSize];
  // A simple reply is valid for every command but READ and BLOCK_STATUS,
  // structured replies or not.
  SimpleReply{0, req.handle}.store(buf);
  co_await send_reply(buf, sizeof buf);
}

uint32_t Session::validate(const Request& req) const {
  // Command flags (proto.md, "Request message" and each flag's text): FUA is
  // valid on every command (SEND_FUA is advertised); NO_HOLE only on
  // WRITE_ZEROES; DF only on READ, once structured replies are negotiated
  // (SEND_DF is advertised then; do_read always answers in one chunk);
  // REQ_ONE only on BLOCK_STATUS. FAST_ZERO is not advertised and no other
  // bit is defined: a request carrying one is refused with EINVAL rather
  // than served with the flag ignored.
  uint16_t allowed = kCmdFlagFua;
  if (req.type == kCmdWriteZeroes) allowed |= kCmdFlagNoHole;
  if (req.type == kCmdRead && negotiated_.structured_replies) allowed |= kCmdFlagDf;
  if (req.type == kCmdBlockStatus) allowed |= kCmdFlagReqOne;
  if (req.flags & ~allowed) return kEinval;
  if (req.length > kMaxPayload && req.type != kCmdTrim && req.type != kCmdWriteZeroes &&
      req.type != kCmdBlockStatus && req.type != kCmdCache) {
    return kEinval;
  }
  uint64_t size = exp_.disk->size();
  if (req.offset > size || req.length > size - req.offset) {
    return req.type == kCmdWrite || req.type == kCmdWriteZeroes ? kEnospc : kEinval;
  }
  bool writes = req.type == kCmdWrite || req.type == kCmdTrim || req.type == kCmdWriteZeroes;
  if (writes && exp_.read_only) return kEperm;
  if (req.type == kCmdBlockStatus && negotiated_.contexts.count() == 0) return kEinval;
  // A block-status reply describes a non-empty range: refuse a zero length,
  // as qemu-nbd does ("need non-zero length").
  if (req.type == kCmdBlockStatus && req.length == 0) return kEinval;
  return 0;
}

// One OFFSET_DATA chunk (or a simple reply) carrying the whole range: the
// data is read straight into the reply buffer behind the header.
Task<Status> Session::do_read(const Request& req) {
  if (req.length == 0 && negotiated_.structured_replies) {
    // An OFFSET_DATA chunk carries at least one byte (proto.md): a
    // zero-length read gets the final chunk alone.
    std::byte done[ChunkHeader::kSize];
    ChunkHeader{kReplyFlagDone, kReplyTypeNone, req.handle, 0}.store(done);
    co_await send_reply(done, sizeof done);
    co_return ok_status();
  }
  size_t header = negotiated_.structured_replies ? ChunkHeader::kSize + 8 : SimpleReply::kSize;
  std::vector<std::byte> buf(header + req.length);
  UQ_CO_TRY(co_await exp_.disk->read(req.offset, std::span(buf).subspan(header)));
  if (negotiated_.structured_replies) {
    ChunkHeader{kReplyFlagDone, kReplyTypeOffsetData, req.handle, 8 + req.length}.store(buf.data());
    store_be64(buf.data() + ChunkHeader::kSize, req.offset);
  } else {
    SimpleReply{0, req.handle}.store(buf.data());
  }
  co_await send_reply(buf.data(), buf.size());
  co_return ok_status();
}

Task<Status> Session::do_block_status(const Request& req) {
  std::vector<std::byte> buf;
  UQ_CO_TRY(co_await block_status_.build(req, negotiated_.contexts, buf));
  co_await send_reply(buf.data(), buf.size());
  co_return ok_status();
}

// NBD_CMD_CACHE: reads the range through the disk and drops the data, so
// that its L2 slices are in the L2 cache and its data in the host's page
// cache for the reads that follow (qemu-nbd reads with BDRV_REQ_PREFETCH).
// One bounded scratch buffer per request, whatever the length.
Task<Status> Session::prefetch(const Request& req) {
  constexpr uint64_t kChunk = 1 << 20;
  std::vector<std::byte> scratch(std::min<uint64_t>(req.length, kChunk));
  for (uint64_t done = 0; done < req.length;) {
    const uint64_t n = std::min<uint64_t>(req.length - done, kChunk);
    UQ_CO_TRY(co_await exp_.disk->read(req.offset + done, std::span(scratch).first(n)));
    done += n;
  }
  co_return ok_status();
}

// Runs a validated request. Returns an error to be sent as the reply; on
// success the reply has been sent (or the socket is broken).
Task<Status> Session::execute(const Request& req, const std::vector<std::byte>& payload) {
  Disk& disk = *exp_.disk;
  switch (req.type) {
    case kCmdRead:
      co_return co_await do_read(req);
    case kCmdBlockStatus:
      co_return co_await do_block_status(req);
    case kCmdWrite:
      UQ_CO_TRY(co_await disk.write(req.offset, payload));
      break;
    case kCmdWriteZeroes:
      UQ_CO_TRY(co_await disk.write_zeroes(req.offset, req.length, !(req.flags & kCmdFlagNoHole)));
      break;
    case kCmdTrim:
      UQ_CO_TRY(co_await disk.discard(req.offset, req.length));
      break;
    case kCmdCache:
      UQ_CO_TRY(co_await prefetch(req));
      break;
    case kCmdFlush:
      break;
    default:
      co_return Error(EINVAL, "unknown command");
  }
  if (req.type == kCmdFlush || (req.flags & kCmdFlagFua)) UQ_CO_TRY(co_await disk.flush());
  co_await reply_ok(req);
  co_return ok_status();
}

Task<void> Session::handle(Request req, std::vector<std::byte> payload) {
  uint32_t invalid = validate(req);
  if (invalid != 0) {
    co_await reply_error(req, invalid, "invalid request");
  } else {
    Status s = co_await execute(req, payload);
    if (!s.ok()) co_await reply_error(req, to_nbd_error(s.code()), s.message());
  }
  slot_freed_.wake_one();
}

Task<void> Session::run() {
  for (;;) {
    while (requests_.active() >= kMaxInFlight) co_await slot_freed_.wait();
    std::byte raw[Request::kSize];
    Status got = co_await recv_exact(fd_, raw, sizeof raw);
    if (!got.ok() || broken_) break;
    Request req = Request::load(raw);
    // A bad magic means the stream is out of step: nothing after it can be
    // trusted, so the connection ends (as the spec allows).
    if (req.magic != kRequestMagic) break;
    if (req.type == kCmdDisc) break;
    std::vector<std::byte> payload;
    if (req.type == kCmdWrite) {
      // The payload must be consumed to stay in step; one too large to
      // buffer ends the connection instead.
      if (req.length > kMaxPayload) break;
      payload.resize(req.length);
      Status body = co_await recv_exact(fd_, payload.data(), payload.size());
      if (!body.ok()) break;
    }
    requests_.spawn(handle(req, std::move(payload)));
  }
  co_await requests_.join();
}

}  // namespace

Task<void> serve_transmission(int fd, const Export& exp, Negotiated negotiated) {
  Session session(fd, exp, negotiated);
  co_await session.run();
}

}  // namespace uqcow::nbd
