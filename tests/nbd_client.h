// Test-side NBD tooling for `uqcow serve`: the server as a child process, a
// socket directory short enough for a unix socket path, and a hand-driven
// client that can pipeline (many requests in flight, replies in any order).
//
// The client is independent of nbd/: the few wire constants it needs are
// written out here again from the protocol document, so that the server's own
// definitions are not their own oracle. It speaks only what the tests need:
// the fixed-newstyle handshake with NBD_OPT_EXPORT_NAME (so every reply is a
// simple reply) and the transmission requests.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

namespace uqcow::testing {

// The wire constants, written down again from the NBD protocol on purpose:
// the client is an independent check of the server, so it does not share
// nbd/protocol.h (a wrong constant there would be wrong on both sides).
namespace nbd_wire {
constexpr uint32_t kRequestMagic = 0x25609513u;
constexpr uint32_t kSimpleReplyMagic = 0x67446698u;
enum Command : uint16_t {
  kCmdRead = 0,
  kCmdWrite = 1,
  kCmdDisc = 2,
  kCmdFlush = 3,
  kCmdTrim = 4,
  kCmdWriteZeroes = 6,
};
constexpr uint16_t kCmdFlagFua = 1 << 0;
constexpr uint16_t kCmdFlagNoHole = 1 << 1;
// Transmission flags of the export.
constexpr uint16_t kFlagSendTrim = 1 << 5;
constexpr uint16_t kFlagSendWriteZeroes = 1 << 6;
}  // namespace nbd_wire

// A fresh directory under /tmp for a unix socket, removed (with the socket)
// on destruction. A socket path is limited to 108 bytes, which $TEST_TMPDIR
// under Bazel's sandbox exceeds.
class SocketDir {
 public:
  SocketDir();
  ~SocketDir();
  SocketDir(const SocketDir&) = delete;
  SocketDir& operator=(const SocketDir&) = delete;

  bool ok() const { return !dir_.empty(); }
  const std::string& socket() const { return socket_; }
  // The socket as an NBD URI, for nbdinfo, qemu-img, qemu-io and fio.
  std::string uri() const { return "nbd+unix:///?socket=" + socket_; }

 private:
  std::string dir_;
  std::string socket_;
};

// An NBD server child process listening on a unix socket: by default
// `uqcow serve --socket SOCKET [EXTRA...] IMAGE`. The destructor SIGKILLs
// it if it is still running; terminate() is the clean shutdown.
class ServeProcess {
 public:
  ServeProcess(const std::string& image, const std::string& socket,
               const std::vector<std::string>& extra_args = {});
  // Any server command (argv[0] looked up in PATH) that listens on `socket`.
  static std::unique_ptr<ServeProcess> command(const std::vector<std::string>& argv, const std::string& socket);
  ~ServeProcess();
  ServeProcess(const ServeProcess&) = delete;
  ServeProcess& operator=(const ServeProcess&) = delete;

  // Waits up to 5 s until the socket accepts connections (it exists a
  // moment before listen(), when connecting still fails). False if the
  // process died or the time ran out.
  bool wait_ready() const;
  bool running() const;
  // SIGTERM, then waits up to `timeout_ms` for the exit. Returns the exit
  // status, 128 + the signal number if a signal ended it, or -1 if it was
  // still running at the deadline (it is then SIGKILLed).
  int terminate(int timeout_ms = 30000);

 private:
  explicit ServeProcess(const std::string& socket) : socket_(socket) {}
  void start(const std::vector<std::string>& argv);

  std::string socket_;
  pid_t pid_ = -1;
};

class RawClient;

// One simple reply.
struct NbdReply {
  uint64_t handle = 0;
  uint32_t error = 0;          // 0, or the NBD error number (EIO = 5, ...)
  std::vector<uint8_t> data;   // a successful READ's bytes
};

// A reply and the client (its index in the span given to pump) it came on.
struct NbdCompletion {
  size_t client = 0;
  NbdReply reply;
};

// Drives several pipelined clients from one thread with poll(): sends queued
// requests and receives replies on every client until at least one reply has
// arrived, then appends every reply received so far to `out`, in arrival
// order. False if a connection failed, the server broke the protocol, or
// nothing arrived for `timeout_ms` while requests were in flight; `error`
// then says which client and why.
bool pump(std::span<RawClient* const> clients, std::vector<NbdCompletion>& out, std::string& error,
          int timeout_ms = 60000);
// pump() until no client has a request in flight.
bool drain(std::span<RawClient* const> clients, std::vector<NbdCompletion>& out, std::string& error,
           int timeout_ms = 60000);

// A hand-driven NBD client on the server's unix socket.
//
// Two ways to use it, not mixed on one connection while requests are in
// flight:
//  - blocking, one request at a time (send_bytes, reply_error,
//    closed_by_server), for malformed requests no real client sends;
//  - pipelined: submit() queues requests with distinct handles, and pump()
//    sends them and receives replies, over several clients at once, without
//    ever blocking on a full socket (so a deep queue cannot deadlock against
//    a server that stops reading while its replies are not taken).
class RawClient {
 public:
  explicit RawClient(const std::string& socket_path);
  ~RawClient();
  RawClient(const RawClient&) = delete;
  RawClient& operator=(const RawClient&) = delete;

  bool connected() const { return connected_; }
  uint64_t export_size() const { return export_size_; }
  uint16_t transmission_flags() const { return transmission_flags_; }
  // Why the connection failed or was given up, for messages.
  const std::string& error() const { return error_; }

  // ---- blocking, one at a time ----
  bool send_bytes(const std::vector<uint8_t>& b);
  // A request header (28 bytes), without a payload.
  static std::vector<uint8_t> request(uint32_t magic, uint16_t type, uint64_t offset, uint32_t length,
                                      uint16_t flags = 0, uint64_t handle = 0x1234);
  // The error field of the next simple reply, or -1 if the connection
  // closed. A successful read's reply carries `data_len` bytes, consumed too.
  int64_t reply_error(size_t data_len = 0);
  // True when the server closed the connection (recv sees EOF or a reset).
  bool closed_by_server();

  // ---- pipelined ----
  // Queues one request and returns its handle (unique on this connection).
  // A WRITE sends `payload` (its length is the request's); other commands
  // take `length` and no payload. Nothing is sent until pump().
  uint64_t submit(uint16_t type, uint16_t flags, uint64_t offset, uint32_t length,
                  std::span<const uint8_t> payload = {});
  // Requests submitted whose reply has not arrived.
  size_t in_flight() const { return in_flight_.size(); }
  // submit() and pump() until its reply: one request at a time. False (and
  // error() set) if the connection failed.
  bool call(uint16_t type, uint16_t flags, uint64_t offset, uint32_t length, NbdReply& reply,
            std::span<const uint8_t> payload = {});

 private:
  friend bool pump(std::span<RawClient* const>, std::vector<NbdCompletion>&, std::string&, int);
  static void put(uint8_t* p, uint64_t v, int n);
  bool recv_all(uint8_t* p, size_t n);
  bool fail(const std::string& why);
  // Sends what it can of the queued bytes without blocking.
  bool on_writable();
  // Receives what is there without blocking and appends every complete
  // reply to `replies`, in arrival order.
  bool on_readable(std::vector<NbdReply>& replies);
  bool parse_replies(std::vector<NbdReply>& replies);

  int fd_ = -1;
  bool connected_ = false;
  uint64_t export_size_ = 0;
  uint16_t transmission_flags_ = 0;
  std::string error_;
  uint64_t next_handle_ = 1;
  // handle -> bytes of data its successful reply carries (READ's length).
  std::unordered_map<uint64_t, uint32_t> in_flight_;
  std::vector<uint8_t> out_;
  size_t out_sent_ = 0;
  std::vector<uint8_t> in_;
  size_t in_parsed_ = 0;
};

}  // namespace uqcow::testing
