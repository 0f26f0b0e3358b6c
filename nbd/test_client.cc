#include "nbd/test_client.h"

#include <sys/socket.h>
#include <sys/time.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <set>

#include "block/endian.h"

namespace uqcow::nbd::testing {
namespace {

// Bounds on lengths the server sends, so that garbage cannot make the client
// allocate without limit.
constexpr uint32_t kMaxOptionReply = 64 * 1024;
constexpr uint32_t kMaxChunk = (64u << 20) + 8;

void put16(Bytes& b, uint16_t v) {
  b.resize(b.size() + 2);
  store_be16(b.data() + b.size() - 2, v);
}
void put32(Bytes& b, uint32_t v) {
  b.resize(b.size() + 4);
  store_be32(b.data() + b.size() - 4, v);
}
void put64(Bytes& b, uint64_t v) {
  b.resize(b.size() + 8);
  store_be64(b.data() + b.size() - 8, v);
}
void put_string(Bytes& b, const std::string& s) { b.insert(b.end(), s.begin(), s.end()); }

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "%#llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

Client::Client(int fd) : fd_(fd) {
  // Half of a small test's 60 s, so that a hung server fails the test with
  // the client's message rather than a bare timeout.
  timeval limit{.tv_sec = 30, .tv_usec = 0};
  ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
  ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof limit);
}

bool Client::fail(const std::string& why) {
  if (error_.empty()) error_ = why;
  return false;
}

std::nullopt_t Client::fail_none(const std::string& why) {
  fail(why);
  return std::nullopt;
}

bool Client::send(const Bytes& bytes) {
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::send(fd_, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail(std::string("send: ") + std::strerror(errno));
    done += static_cast<size_t>(n);
  }
  return true;
}

bool Client::recv(size_t len, Bytes* out) {
  out->resize(len);
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::recv(fd_, out->data() + done, len - done, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail(std::string("recv: ") + std::strerror(errno));
    if (n == 0) return fail("the server closed the connection");
    done += static_cast<size_t>(n);
  }
  return true;
}

bool Client::closed_by_server() {
  uint8_t byte;
  ssize_t n;
  do {
    n = ::recv(fd_, &byte, 1, 0);
  } while (n < 0 && errno == EINTR);
  if (n == 0 || (n < 0 && errno == ECONNRESET)) return true;
  if (n > 0) return fail("the server sent more where it should have closed the connection");
  return fail(std::string("recv: ") + std::strerror(errno));
}

// ---- handshake ----

std::optional<uint16_t> Client::greeting() {
  Bytes b;
  if (!recv(18, &b)) return std::nullopt;
  if (load_be64(b.data()) != wire::kNbdMagic) return fail_none("greeting: not NBDMAGIC");
  if (load_be64(b.data() + 8) != wire::kIHaveOpt) return fail_none("greeting: not IHAVEOPT (newstyle)");
  return load_be16(b.data() + 16);
}

bool Client::send_client_flags(uint32_t flags) {
  Bytes b;
  put32(b, flags);
  return send(b);
}

bool Client::send_option(uint32_t option, const Bytes& data) {
  Bytes b;
  put64(b, wire::kIHaveOpt);
  put32(b, option);
  put32(b, static_cast<uint32_t>(data.size()));
  b.insert(b.end(), data.begin(), data.end());
  return send(b);
}

std::optional<OptionReply> Client::option_reply(uint32_t option) {
  Bytes h;
  if (!recv(20, &h)) return std::nullopt;
  if (load_be64(h.data()) != wire::kOptionReplyMagic) return fail_none("option reply: bad magic");
  OptionReply r{load_be32(h.data() + 8), load_be32(h.data() + 12), {}};
  uint32_t length = load_be32(h.data() + 16);
  if (r.option != option) {
    return fail_none("option reply for option " + std::to_string(r.option) + ", sent " + std::to_string(option));
  }
  if (length > kMaxOptionReply) return fail_none("option reply of " + std::to_string(length) + " bytes");
  if (!recv(length, &r.data)) return std::nullopt;
  return r;
}

std::optional<uint32_t> Client::go(const std::string& name, ExportInfo* info) {
  Bytes d;
  put32(d, static_cast<uint32_t>(name.size()));
  put_string(d, name);
  put16(d, 0);  // no NBD_INFO requests: the server still owes NBD_INFO_EXPORT
  if (!send_option(wire::kOptGo, d)) return std::nullopt;
  bool export_seen = false;
  for (;;) {
    auto r = option_reply(wire::kOptGo);
    if (!r) return std::nullopt;
    if (r->type & wire::kRepErrBit) return r->type;
    if (r->type == wire::kRepAck) {
      if (!r->data.empty()) return fail_none("GO: ACK with data");
      if (!export_seen) return fail_none("GO: ACK without NBD_INFO_EXPORT");
      return 0u;
    }
    if (r->type != wire::kRepInfo || r->data.size() < 2) {
      return fail_none("GO: unexpected reply type " + hex(r->type));
    }
    uint16_t kind = load_be16(r->data.data());
    if (kind == wire::kInfoExport) {
      if (r->data.size() != 12) return fail_none("GO: NBD_INFO_EXPORT of the wrong length");
      info->size = load_be64(r->data.data() + 2);
      info->flags = load_be16(r->data.data() + 10);
      export_seen = true;
    } else if (kind == wire::kInfoBlockSize) {
      if (r->data.size() != 14) return fail_none("GO: NBD_INFO_BLOCK_SIZE of the wrong length");
      info->block_sizes = {load_be32(r->data.data() + 2), load_be32(r->data.data() + 6),
                           load_be32(r->data.data() + 10)};
    }  // other NBD_INFO types: clients ignore what they did not ask for
  }
}

bool Client::negotiate_structured_replies() {
  if (!send_option(wire::kOptStructuredReply)) return false;
  auto r = option_reply(wire::kOptStructuredReply);
  if (!r) return false;
  if (r->type != wire::kRepAck || !r->data.empty()) return fail("STRUCTURED_REPLY: not a plain ACK");
  structured_ = true;
  return true;
}

bool Client::select_base_allocation(const std::string& name) {
  const std::string query = "base:allocation";
  auto r = meta_contexts(wire::kOptSetMetaContext, name, {query});
  if (!r) return false;
  if (r->error != 0) return fail("SET_META_CONTEXT base:allocation refused with " + hex(r->error));
  if (r->contexts.size() != 1 || r->contexts[0].second != query) {
    return fail("SET_META_CONTEXT base:allocation: not exactly base:allocation selected");
  }
  return true;
}

std::optional<MetaContextReply> Client::meta_contexts(uint32_t option, const std::string& name,
                                                      const std::vector<std::string>& queries) {
  Bytes d;
  put32(d, static_cast<uint32_t>(name.size()));
  put_string(d, name);
  put32(d, static_cast<uint32_t>(queries.size()));
  for (const std::string& q : queries) {
    put32(d, static_cast<uint32_t>(q.size()));
    put_string(d, q);
  }
  if (!send_option(option, d)) return std::nullopt;
  return meta_context_replies(option);
}

std::optional<MetaContextReply> Client::meta_context_replies(uint32_t option) {
  const bool set = option == wire::kOptSetMetaContext;
  if (set) selected_.clear();
  MetaContextReply out;
  std::map<std::string, uint32_t> selected;
  std::set<uint32_t> ids;
  for (;;) {
    auto r = option_reply(option);
    if (!r) return std::nullopt;
    if (r->type & wire::kRepErrBit) {
      if (!out.contexts.empty()) return fail_none("META_CONTEXT replies before an error reply");
      out.error = r->type;
      out.message.assign(r->data.begin(), r->data.end());
      return out;
    }
    if (r->type == wire::kRepAck) {
      if (!r->data.empty()) return fail_none("META_CONTEXT: ACK with data");
      break;
    }
    if (r->type != wire::kRepMetaContext) return fail_none("META_CONTEXT: reply type " + hex(r->type));
    if (r->data.size() < 5) return fail_none("META_CONTEXT reply without a context name");
    const uint32_t id = load_be32(r->data.data());
    std::string context(r->data.begin() + 4, r->data.end());
    if (set && (!ids.insert(id).second || !selected.emplace(context, id).second)) {
      return fail_none("SET_META_CONTEXT selected id " + std::to_string(id) + " (" + context + ") twice");
    }
    out.contexts.emplace_back(id, std::move(context));
  }
  if (set) selected_ = std::move(selected);
  return out;
}

std::optional<ExportInfo> Client::handshake(const std::string& name) {
  auto flags = greeting();
  if (!flags) return std::nullopt;
  if (!(*flags & wire::kFlagFixedNewstyle)) return fail_none("the server is not fixed-newstyle");
  uint32_t client_flags = wire::kClientFixedNewstyle | (*flags & wire::kFlagNoZeroes ? wire::kClientNoZeroes : 0);
  if (!send_client_flags(client_flags)) return std::nullopt;
  if (!negotiate_structured_replies() || !select_base_allocation(name)) return std::nullopt;
  ExportInfo info;
  auto refused = go(name, &info);
  if (!refused) return std::nullopt;
  if (*refused != 0) return fail_none("GO refused with " + hex(*refused));
  return info;
}

// ---- transmission ----

std::optional<uint64_t> Client::submit(uint16_t type, uint64_t offset, uint32_t length, uint16_t flags,
                                       const Bytes& payload) {
  const uint64_t cookie = next_cookie_++;
  Bytes b;
  put32(b, wire::kRequestMagic);
  put16(b, flags);
  put16(b, type);
  put64(b, cookie);
  put64(b, offset);
  put32(b, length);
  b.insert(b.end(), payload.begin(), payload.end());
  Pending p{type, flags, offset, length, {}, {}};
  if (type == wire::kCmdRead && structured_) {
    p.reply.data.assign(length, 0);
    p.covered.assign(length, false);
  }
  pending_.emplace(cookie, std::move(p));
  if (!send(b)) return std::nullopt;
  return cookie;
}

bool Client::send_raw_request(uint32_t magic, uint16_t type, uint64_t offset, uint32_t length) {
  Bytes b;
  put32(b, magic);
  put16(b, 0);
  put16(b, type);
  put64(b, next_cookie_++);
  put64(b, offset);
  put32(b, length);
  return send(b);
}

std::optional<std::map<uint64_t, Reply>> Client::wait_all() {
  while (!pending_.empty()) {
    if (!receive_message()) return std::nullopt;
  }
  return std::exchange(done_, {});
}

std::optional<Reply> Client::call(uint16_t type, uint64_t offset, uint32_t length, uint16_t flags,
                                  const Bytes& payload) {
  if (!pending_.empty()) return fail_none("call() with requests in flight");
  auto cookie = submit(type, offset, length, flags, payload);
  if (!cookie) return std::nullopt;
  auto replies = wait_all();
  if (!replies) return std::nullopt;
  return std::move(replies->at(*cookie));
}

bool Client::receive_message() {
  Bytes magic;
  if (!recv(4, &magic)) return false;
  const uint32_t m = load_be32(magic.data());
  Bytes h;
  if (m == wire::kSimpleReplyMagic) {
    if (!recv(12, &h)) return false;
  } else if (m == wire::kStructuredReplyMagic) {
    if (!structured_) return fail("a structured reply chunk without STRUCTURED_REPLY negotiated");
    if (!recv(16, &h)) return false;
  } else {
    return fail("reply with bad magic " + hex(m));
  }
  // Both headers hold the cookie 4 bytes after the magic.
  const uint64_t cookie = load_be64(h.data() + 4);
  auto it = pending_.find(cookie);
  if (it == pending_.end()) return fail("reply for cookie " + hex(cookie) + ", which is not in flight");
  if (m == wire::kSimpleReplyMagic) {
    it->second.reply.error = load_be32(h.data());
    return receive_simple(cookie, it->second);
  }
  return receive_chunk(load_be16(h.data()), load_be16(h.data() + 2), cookie, load_be32(h.data() + 12),
                       it->second);
}

bool Client::receive_simple(uint64_t cookie, Pending& p) {
  if (p.reply.messages++ > 0) return fail("a simple reply after chunks for cookie " + hex(cookie));
  if (structured_ && p.type == wire::kCmdRead) {
    return fail("a simple reply to READ with structured replies negotiated");
  }
  if (p.type == wire::kCmdBlockStatus && p.reply.error == 0) {
    return fail("BLOCK_STATUS answered by a simple reply");
  }
  if (p.type == wire::kCmdRead && p.reply.error == 0 && !recv(p.length, &p.reply.data)) return false;
  return finish(cookie, p);
}

bool Client::receive_chunk(uint16_t flags, uint16_t type, uint64_t cookie, uint32_t length, Pending& p) {
  if (length > kMaxChunk) return fail("a chunk of " + std::to_string(length) + " bytes");
  Bytes payload;
  if (!recv(length, &payload)) return false;
  ++p.reply.messages;
  if (!chunk_data(type, payload, p)) return false;
  if (type == wire::kReplyNone && !(flags & wire::kReplyFlagDone)) return fail("NBD_REPLY_TYPE_NONE without DONE");
  if (flags & wire::kReplyFlagDone) return finish(cookie, p);
  return true;
}

// Checks one chunk's payload against the rules for its type and adds it to
// the reply.
bool Client::chunk_data(uint16_t type, const Bytes& payload, Pending& p) {
  const size_t n = payload.size();
  switch (type) {
    case wire::kReplyNone:
      return n == 0 || fail("NBD_REPLY_TYPE_NONE with a payload");
    case wire::kReplyOffsetData:
    case wire::kReplyOffsetHole: {
      if (p.type != wire::kCmdRead) return fail("a content chunk for a command other than READ");
      const bool data = type == wire::kReplyOffsetData;
      if (data ? n < 9 : n != 12) return fail("a content chunk of the wrong length");
      const uint64_t offset = load_be64(payload.data());
      const uint64_t len = data ? n - 8 : load_be32(payload.data() + 8);
      if (len == 0) return fail("an empty content chunk");
      if (offset < p.offset || offset - p.offset > p.length || len > p.length - (offset - p.offset)) {
        return fail("a content chunk outside the request");
      }
      const size_t at = offset - p.offset;
      for (size_t i = 0; i < len; ++i) {
        if (p.covered[at + i]) return fail("content chunks overlap");
        p.covered[at + i] = true;
        p.reply.data[at + i] = data ? payload[8 + i] : 0;
      }
      return true;
    }
    case wire::kReplyBlockStatus:
      return status_chunk(payload, p);
    case wire::kReplyError:
    case wire::kReplyErrorOffset: {
      const size_t fixed = type == wire::kReplyError ? 6 : 14;
      if (n < fixed) return fail("an error chunk of the wrong length");
      const uint32_t error = load_be32(payload.data());
      const uint16_t message_len = load_be16(payload.data() + 4);
      if (error == 0) return fail("an error chunk with error 0");
      if (message_len > n - fixed) return fail("an error chunk's message overruns it");
      if (!p.errored) {
        p.reply.error = error;
        p.reply.message.assign(payload.begin() + 6, payload.begin() + 6 + message_len);
      }
      p.errored = true;
      return true;
    }
    default:
      return fail("an unknown chunk type " + hex(type));
  }
}

// One BLOCK_STATUS chunk: for a context the last SET selected, at most one
// per context, descriptors of non-zero length covering at most the request,
// exactly one with REQ_ONE.
bool Client::status_chunk(const Bytes& payload, Pending& p) {
  const size_t n = payload.size();
  if (p.type != wire::kCmdBlockStatus) return fail("a BLOCK_STATUS chunk for another command");
  if (n < 12 || (n - 4) % 8 != 0) return fail("a BLOCK_STATUS chunk of the wrong length");
  StatusChunk chunk{load_be32(payload.data()), {}};
  bool selected = false;
  for (const auto& [name, id] : selected_) selected |= id == chunk.context;
  if (!selected) return fail("BLOCK_STATUS for context id " + std::to_string(chunk.context) + ", never selected");
  for (const StatusChunk& c : p.reply.chunks) {
    if (c.context == chunk.context) return fail("two BLOCK_STATUS chunks for one context");
  }
  uint64_t sum = 0;
  for (size_t at = 4; at < n; at += 8) {
    uint32_t len = load_be32(payload.data() + at);
    if (len == 0) return fail("a BLOCK_STATUS descriptor of length 0");
    sum += len;
    chunk.extents.emplace_back(len, load_be32(payload.data() + at + 4));
  }
  if (sum > p.length) return fail("BLOCK_STATUS descriptors longer than the request");
  if ((p.flags & wire::kCmdFlagReqOne) && chunk.extents.size() != 1) {
    return fail("BLOCK_STATUS with REQ_ONE gave more than one descriptor");
  }
  if (p.reply.chunks.empty()) {
    p.reply.context = chunk.context;
    p.reply.extents = chunk.extents;
  }
  p.reply.chunks.push_back(std::move(chunk));
  return true;
}

bool Client::finish(uint64_t cookie, Pending& p) {
  if (p.reply.error == 0 && structured_ && p.type == wire::kCmdRead) {
    for (bool c : p.covered) {
      if (!c) return fail("READ reply done without covering the whole request");
    }
  }
  if (p.reply.error == 0 && p.type == wire::kCmdBlockStatus && p.reply.chunks.size() != selected_.size()) {
    return fail("BLOCK_STATUS reply done with " + std::to_string(p.reply.chunks.size()) + " chunks for " +
                std::to_string(selected_.size()) + " selected contexts");
  }
  done_.emplace(cookie, std::move(p.reply));
  pending_.erase(cookie);  // `p` is gone
  return true;
}

}  // namespace uqcow::nbd::testing
