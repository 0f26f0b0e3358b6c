// A blocking NBD client for in-process tests of the server: it speaks the
// fixed-newstyle handshake (option by option, so a test can send what a real
// client would not) and the transmission phase with pipelining: requests go
// out with distinct cookies, replies are matched by cookie whatever their
// order, and every reply is checked against the protocol's rules for its
// command (magic, cookie, chunk types and lengths, READ coverage, BLOCK_STATUS
// descriptors) before a test sees it.
//
// The client is an independent check of the server: the wire constants are
// written out again from the protocol document
// (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md) rather
// than taken from nbd/protocol.h, so a wrong constant there cannot be wrong
// on both sides.
//
// Every call blocks; a send or receive that makes no progress for 30 s
// fails the call (a safety net against a hung server, not a timing check).
// A failed call records why in error(); the connection is then unusable.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace uqcow::nbd::testing {

using Bytes = std::vector<uint8_t>;

namespace wire {
constexpr uint64_t kNbdMagic = 0x4e42444d41474943ull;  // "NBDMAGIC"
constexpr uint64_t kIHaveOpt = 0x49484156454f5054ull;  // "IHAVEOPT"
constexpr uint64_t kOptionReplyMagic = 0x3e889045565a9ull;
// Handshake flags (server) and client flags.
constexpr uint16_t kFlagFixedNewstyle = 1 << 0;
constexpr uint16_t kFlagNoZeroes = 1 << 1;
constexpr uint32_t kClientFixedNewstyle = 1 << 0;
constexpr uint32_t kClientNoZeroes = 1 << 1;
// Options.
constexpr uint32_t kOptExportName = 1;
constexpr uint32_t kOptAbort = 2;
constexpr uint32_t kOptStartTls = 5;
constexpr uint32_t kOptGo = 7;
constexpr uint32_t kOptStructuredReply = 8;
constexpr uint32_t kOptListMetaContext = 9;
constexpr uint32_t kOptSetMetaContext = 10;
// Option reply types; errors have bit 31 set.
constexpr uint32_t kRepAck = 1;
constexpr uint32_t kRepInfo = 3;
constexpr uint32_t kRepMetaContext = 4;
constexpr uint32_t kRepErrBit = 1u << 31;
constexpr uint32_t kRepErrUnsup = kRepErrBit + 1;
constexpr uint32_t kRepErrPolicy = kRepErrBit + 2;
constexpr uint32_t kRepErrInvalid = kRepErrBit + 3;
constexpr uint32_t kRepErrUnknown = kRepErrBit + 6;
// NBD_INFO_* in NBD_REP_INFO replies.
constexpr uint16_t kInfoExport = 0;
constexpr uint16_t kInfoBlockSize = 3;
// Transmission flags.
constexpr uint16_t kFlagHasFlags = 1 << 0;
constexpr uint16_t kFlagReadOnly = 1 << 1;
constexpr uint16_t kFlagSendFlush = 1 << 2;
constexpr uint16_t kFlagSendFua = 1 << 3;
constexpr uint16_t kFlagSendTrim = 1 << 5;
constexpr uint16_t kFlagSendWriteZeroes = 1 << 6;
constexpr uint16_t kFlagSendDf = 1 << 7;
constexpr uint16_t kFlagSendCache = 1 << 10;
// Requests.
constexpr uint32_t kRequestMagic = 0x25609513u;
constexpr uint16_t kCmdRead = 0;
constexpr uint16_t kCmdWrite = 1;
constexpr uint16_t kCmdDisc = 2;
constexpr uint16_t kCmdFlush = 3;
constexpr uint16_t kCmdTrim = 4;
constexpr uint16_t kCmdCache = 5;
constexpr uint16_t kCmdWriteZeroes = 6;
constexpr uint16_t kCmdBlockStatus = 7;
constexpr uint16_t kCmdFlagFua = 1 << 0;
constexpr uint16_t kCmdFlagNoHole = 1 << 1;
constexpr uint16_t kCmdFlagDf = 1 << 2;
constexpr uint16_t kCmdFlagReqOne = 1 << 3;
// Replies.
constexpr uint32_t kSimpleReplyMagic = 0x67446698u;
constexpr uint32_t kStructuredReplyMagic = 0x668e33efu;
constexpr uint16_t kReplyFlagDone = 1 << 0;
constexpr uint16_t kReplyNone = 0;
constexpr uint16_t kReplyOffsetData = 1;
constexpr uint16_t kReplyOffsetHole = 2;
constexpr uint16_t kReplyBlockStatus = 5;
constexpr uint16_t kReplyError = 0x8001;
constexpr uint16_t kReplyErrorOffset = 0x8002;
// base:allocation states.
constexpr uint32_t kStateHole = 1 << 0;
constexpr uint32_t kStateZero = 1 << 1;
// qemu:dirty-bitmap:NAME state (qemu's docs/interop/nbd.txt).
constexpr uint32_t kStateDirty = 1 << 0;
// Errors.
constexpr uint32_t kEperm = 1;
constexpr uint32_t kEinval = 22;
constexpr uint32_t kEnospc = 28;
}  // namespace wire

struct OptionReply {
  uint32_t option = 0;
  uint32_t type = 0;
  Bytes data;
};

// What NBD_OPT_GO told about the export.
struct ExportInfo {
  uint64_t size = 0;
  uint16_t flags = 0;
  // NBD_INFO_BLOCK_SIZE, when sent: minimum, preferred, maximum.
  std::optional<std::array<uint32_t, 3>> block_sizes;
};

// The answer to LIST_META_CONTEXT or SET_META_CONTEXT.
struct MetaContextReply {
  uint32_t error = 0;  // 0, or the error reply's type (then no contexts)
  std::string message;
  std::vector<std::pair<uint32_t, std::string>> contexts;  // (id, name), in reply order
};

using Extents = std::vector<std::pair<uint32_t, uint32_t>>;  // (length, flags)

// One NBD_REPLY_TYPE_BLOCK_STATUS chunk.
struct StatusChunk {
  uint32_t context = 0;
  Extents extents;
};

// One request's complete reply.
struct Reply {
  uint32_t error = 0;         // 0, or the NBD error (simple reply or error chunk)
  std::string message;        // an error chunk's message
  Bytes data;                 // READ: the bytes, reassembled
  // BLOCK_STATUS: every chunk in arrival order (one per selected context),
  // and the first one's context and extents again (with one context
  // selected, the only chunk).
  std::vector<StatusChunk> chunks;
  uint32_t context = 0;
  Extents extents;
  int messages = 0;           // simple replies or chunks it took
};

class Client {
 public:
  // Does not own `fd`.
  explicit Client(int fd);

  const std::string& error() const { return error_; }

  // ---- bytes ----
  bool send(const Bytes& bytes);
  bool recv(size_t len, Bytes* out);
  // True when the server has closed the connection and sent nothing more.
  bool closed_by_server();

  // ---- handshake, one step at a time ----
  // Reads the greeting and checks its magics; returns the handshake flags.
  std::optional<uint16_t> greeting();
  bool send_client_flags(uint32_t flags);
  bool send_option(uint32_t option, const Bytes& data = {});
  // The next option reply; it must answer `option`.
  std::optional<OptionReply> option_reply(uint32_t option);
  // NBD_OPT_GO without NBD_INFO requests: the INFO replies, then ACK (set in
  // `info`), or the error reply's type (returned; 0 on success).
  std::optional<uint32_t> go(const std::string& name, ExportInfo* info);
  // STRUCTURED_REPLY (ACK expected) and SET_META_CONTEXT for
  // base:allocation (one META_CONTEXT and ACK expected); the id is kept
  // for checking BLOCK_STATUS replies.
  bool negotiate_structured_replies();
  bool select_base_allocation(const std::string& name);
  // LIST_META_CONTEXT or SET_META_CONTEXT of `queries` on export `name`:
  // the META_CONTEXT replies up to ACK, or the error reply. A SET forgets
  // the contexts selected before (whatever its outcome: the server may
  // drop them on an error) and, on success, selects those it replied;
  // BLOCK_STATUS replies are then checked against them (one chunk each).
  std::optional<MetaContextReply> meta_contexts(uint32_t option, const std::string& name,
                                                const std::vector<std::string>& queries);
  // The same for option data sent as is (send_option), malformed or not.
  std::optional<MetaContextReply> meta_context_replies(uint32_t option);
  // The ids selected by the last SET, by context name.
  const std::map<std::string, uint32_t>& selected_contexts() const { return selected_; }
  // The usual handshake: greeting, FIXED_NEWSTYLE | NO_ZEROES,
  // STRUCTURED_REPLY, SET_META_CONTEXT base:allocation, GO.
  std::optional<ExportInfo> handshake(const std::string& name);
  // Tells the client that the handshake ended (EXPORT_NAME) with or without
  // structured replies; GO and the helpers above do it themselves.
  void set_structured(bool on) { structured_ = on; }
  uint32_t base_allocation_id() const {
    auto it = selected_.find("base:allocation");
    return it == selected_.end() ? UINT32_MAX : it->second;
  }

  // ---- transmission ----
  // Sends one request with a new cookie and returns the cookie. A WRITE
  // carries `payload` (its length is the request's); other commands use
  // `length`.
  std::optional<uint64_t> submit(uint16_t type, uint64_t offset, uint32_t length, uint16_t flags = 0,
                                 const Bytes& payload = {});
  std::optional<uint64_t> submit_write(uint64_t offset, const Bytes& payload, uint16_t flags = 0) {
    return submit(wire::kCmdWrite, offset, static_cast<uint32_t>(payload.size()), flags, payload);
  }
  // A request header sent as is (any magic), expecting no reply.
  bool send_raw_request(uint32_t magic, uint16_t type, uint64_t offset, uint32_t length);
  size_t in_flight() const { return pending_.size(); }
  // Receives until every request in flight has its complete reply; returns
  // them by cookie (each cookie once) and forgets them.
  std::optional<std::map<uint64_t, Reply>> wait_all();
  // submit() and wait_all() for one request.
  std::optional<Reply> call(uint16_t type, uint64_t offset, uint32_t length, uint16_t flags = 0,
                            const Bytes& payload = {});
  std::optional<Reply> read(uint64_t offset, uint32_t length) { return call(wire::kCmdRead, offset, length); }
  std::optional<Reply> write(uint64_t offset, const Bytes& payload, uint16_t flags = 0) {
    return call(wire::kCmdWrite, offset, static_cast<uint32_t>(payload.size()), flags, payload);
  }

 private:
  struct Pending {
    uint16_t type;
    uint16_t flags;
    uint64_t offset;
    uint32_t length;
    Reply reply;
    std::vector<bool> covered;  // READ with structured replies: bytes received
    bool errored = false;
  };
  // Record the first failure; return false or nullopt for the caller to
  // pass on.
  bool fail(const std::string& why);
  std::nullopt_t fail_none(const std::string& why);
  // Receives one simple reply or one chunk and adds it to its request;
  // a request whose reply is complete moves to done_.
  bool receive_message();
  bool receive_simple(uint64_t cookie, Pending& p);
  bool receive_chunk(uint16_t flags, uint16_t type, uint64_t cookie, uint32_t length, Pending& p);
  bool chunk_data(uint16_t type, const Bytes& payload, Pending& p);
  bool status_chunk(const Bytes& payload, Pending& p);
  bool finish(uint64_t cookie, Pending& p);

  int fd_;
  std::string error_;
  bool structured_ = false;
  std::map<std::string, uint32_t> selected_;  // the last SET's contexts
  uint64_t next_cookie_ = 0xc0de000000000001ull;  // high bits set: a truncated cookie shows
  std::map<uint64_t, Pending> pending_;
  std::map<uint64_t, Reply> done_;
};

}  // namespace uqcow::nbd::testing
