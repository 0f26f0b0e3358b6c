// The fixed-newstyle handshake. Option data is read whole (bounded by
// kMaxOptionLength) before it is parsed, so every reply, even an error, leaves
// the stream at the next option header.
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "nbd/protocol.h"
#include "nbd/session.h"
#include "nbd/socket.h"

namespace uqcow::nbd {
namespace {

constexpr uint32_t kMaxOptionLength = 64 * 1024;

// Bounds-checked reader of an option's data.
class OptionData {
 public:
  explicit OptionData(const std::vector<std::byte>& d) : d_(d) {}
  bool u16(uint16_t* v) { return take(2) && (*v = load_be16(&d_[pos_ - 2]), true); }
  bool u32(uint32_t* v) { return take(4) && (*v = load_be32(&d_[pos_ - 4]), true); }
  bool str(uint32_t len, std::string* s) {
    if (!take(len)) return false;
    s->assign(reinterpret_cast<const char*>(d_.data()) + pos_ - len, len);
    return true;
  }
  bool at_end() const { return pos_ == d_.size(); }
  size_t remaining() const { return d_.size() - pos_; }

 private:
  bool take(size_t n) {
    if (d_.size() - pos_ < n) return false;
    pos_ += n;
    return true;
  }
  const std::vector<std::byte>& d_;
  size_t pos_ = 0;
};

class Negotiation {
 public:
  Negotiation(int fd, const Export& exp) : fd_(fd), exp_(exp) {}
  Task<Result<Negotiated>> run();

 private:
  Task<Status> reply(uint32_t option, uint32_t type, const std::vector<std::byte>& data = {});
  Task<Status> reply_error(uint32_t option, uint32_t type, const std::string& message) {
    std::vector<std::byte> d(message.size());
    std::memcpy(d.data(), message.data(), message.size());
    co_return co_await reply(option, type, d);
  }
  // INFO and GO; sets *go_done when GO succeeded.
  Task<Status> info_or_go(uint32_t option, const std::vector<std::byte>& data, bool* go_done);
  Task<Status> meta_context(uint32_t option, const std::vector<std::byte>& data);
  Task<Status> meta_context_reply(uint32_t option, uint32_t id, std::string_view name);
  Task<Status> export_name_reply();
  Task<Status> greet();
  Task<Status> list(const std::vector<std::byte>& data);

  int fd_;
  const Export& exp_;
  Negotiated result_;
  bool no_zeroes_ = false;
};

Task<Status> Negotiation::reply(uint32_t option, uint32_t type, const std::vector<std::byte>& data) {
  std::vector<std::byte> buf(OptionReplyHeader::kSize + data.size());
  OptionReplyHeader{option, type, static_cast<uint32_t>(data.size())}.store(buf.data());
  if (!data.empty()) std::memcpy(buf.data() + OptionReplyHeader::kSize, data.data(), data.size());
  co_return co_await send_all(fd_, buf.data(), buf.size());
}

Task<Status> Negotiation::info_or_go(uint32_t option, const std::vector<std::byte>& data, bool* go_done) {
  OptionData in(data);
  uint32_t name_len = 0;
  uint16_t n_requests = 0;
  std::string name;
  bool ok = in.u32(&name_len) && in.str(name_len, &name) && in.u16(&n_requests);
  for (uint16_t i = 0; ok && i < n_requests; ++i) {
    uint16_t ignored;
    ok = in.u16(&ignored);
  }
  if (!ok || !in.at_end()) co_return co_await reply_error(option, kRepErrInvalid, "malformed option");
  if (name != exp_.name) co_return co_await reply_error(option, kRepErrUnknown, "no such export");

  // The server sends NBD_INFO_EXPORT always and NBD_INFO_BLOCK_SIZE
  // unrequested too (the spec allows it; clients use it to size requests).
  std::vector<std::byte> info(12);
  store_be16(info.data(), kInfoExport);
  store_be64(info.data() + 2, exp_.disk->size());
  store_be16(info.data() + 10, exp_.transmission_flags(result_.structured_replies));
  UQ_CO_TRY(co_await reply(option, kRepInfo, info));
  std::vector<std::byte> sizes(14);
  store_be16(sizes.data(), kInfoBlockSize);
  store_be32(sizes.data() + 2, kMinBlockSize);
  store_be32(sizes.data() + 6, kPreferredBlockSize);
  store_be32(sizes.data() + 10, kMaxPayload);
  UQ_CO_TRY(co_await reply(option, kRepInfo, sizes));
  UQ_CO_TRY(co_await reply(option, kRepAck));
  if (option == kOptGo) *go_done = true;
  co_return ok_status();
}

// The data of LIST_META_CONTEXT / SET_META_CONTEXT: export name, number of
// queries, queries. Every length and count comes from the client and is
// checked against the option's data (itself bounded by kMaxOptionLength)
// before it is used; EINVAL names the field. Queries longer than
// kMaxStringSize are skipped, as qemu-nbd skips them.
Status parse_meta_queries(const std::vector<std::byte>& data, bool list, const OfferedContexts& offered,
                          std::string* name, MetaContexts* selected) {
  OptionData in(data);
  uint32_t name_len = 0, n_queries = 0;
  if (!in.u32(&name_len)) return Error(EINVAL, "export name length missing");
  if (name_len > kMaxStringSize) {
    return Error(EINVAL, "export name length " + std::to_string(name_len) + " exceeds " +
                             std::to_string(kMaxStringSize));
  }
  if (!in.str(name_len, name)) return Error(EINVAL, "export name length exceeds the option's data");
  if (name->find('\0') != std::string::npos) return Error(EINVAL, "export name: embedded NUL");
  if (!in.u32(&n_queries)) return Error(EINVAL, "number of queries missing");
  if (n_queries > in.remaining() / 4) {  // each query takes at least its length field
    return Error(EINVAL, "number of queries " + std::to_string(n_queries) + " exceeds the option's data");
  }
  if (list && n_queries == 0) *selected = all_contexts(offered);
  std::string query;
  for (uint32_t i = 0; i < n_queries; ++i) {
    uint32_t len = 0;
    if (!in.u32(&len) || !in.str(len, &query)) {
      return Error(EINVAL, "query " + std::to_string(i) + ": length exceeds the option's data");
    }
    if (len > kMaxStringSize) continue;
    if (query.find('\0') != std::string::npos) {
      return Error(EINVAL, "query " + std::to_string(i) + ": embedded NUL");
    }
    match_query(query, list, offered, *selected);
  }
  if (!in.at_end()) return Error(EINVAL, "data after the last query");
  return ok_status();
}

// One NBD_REP_META_CONTEXT: id (0 on LIST, where ids mean nothing) and name.
Task<Status> Negotiation::meta_context_reply(uint32_t option, uint32_t id, std::string_view name) {
  std::vector<std::byte> ctx(4 + name.size());
  store_be32(ctx.data(), option == kOptListMetaContext ? 0 : id);
  std::memcpy(ctx.data() + 4, name.data(), name.size());
  co_return co_await reply(option, kRepMetaContext, ctx);
}

// LIST_META_CONTEXT lists, SET_META_CONTEXT selects (qemu-nbd 7.2's
// nbd_negotiate_meta_queries): one META_CONTEXT reply per context, in
// MetaContexts order, then ACK.
Task<Status> Negotiation::meta_context(uint32_t option, const std::vector<std::byte>& data) {
  const bool list = option == kOptListMetaContext;
  if (!list && !result_.structured_replies) {
    co_return co_await reply_error(option, kRepErrInvalid, "structured replies not negotiated");
  }
  // A SET replaces the previous selection (proto.md); qemu-nbd drops the
  // old one before parsing, so a SET that fails leaves none, here too.
  if (!list) result_.contexts = {};
  std::string name;
  MetaContexts selected;
  Status parsed = parse_meta_queries(data, list, exp_.contexts, &name, &selected);
  if (!parsed.ok()) co_return co_await reply_error(option, kRepErrInvalid, parsed.message());
  if (name != exp_.name) co_return co_await reply_error(option, kRepErrUnknown, "no such export");
  if (selected.base_allocation) UQ_CO_TRY(co_await meta_context_reply(option, kBaseAllocationId, kBaseAllocation));
  if (selected.allocation_depth) {
    UQ_CO_TRY(co_await meta_context_reply(option, kAllocationDepthId, kAllocationDepth));
  }
  for (size_t i = 0; i < exp_.contexts.bitmaps.size(); ++i) {
    if (!selected.bitmap(i)) continue;
    const std::string context = kDirtyBitmapPrefix + exp_.contexts.bitmaps[i].name;
    UQ_CO_TRY(co_await meta_context_reply(option, kDirtyBitmapId + static_cast<uint32_t>(i), context));
  }
  if (!list) result_.contexts = std::move(selected);
  co_return co_await reply(option, kRepAck);
}

// NBD_OPT_EXPORT_NAME has no reply header: size, flags and (unless the
// client set NO_ZEROES) 124 zero bytes.
Task<Status> Negotiation::export_name_reply() {
  std::vector<std::byte> buf(10 + (no_zeroes_ ? 0 : 124));
  store_be64(buf.data(), exp_.disk->size());
  store_be16(buf.data() + 8, exp_.transmission_flags(result_.structured_replies));
  co_return co_await send_all(fd_, buf.data(), buf.size());
}

// The server's greeting and the client's flags.
Task<Status> Negotiation::greet() {
  std::byte hello[18];
  store_be64(hello, kNbdMagic);
  store_be64(hello + 8, kOptionMagic);
  store_be16(hello + 16, kFlagFixedNewstyle | kFlagNoZeroes);
  UQ_CO_TRY(co_await send_all(fd_, hello, sizeof hello));
  std::byte client_flags[4];
  UQ_CO_TRY(co_await recv_exact(fd_, client_flags, sizeof client_flags));
  const uint32_t flags = load_be32(client_flags);
  // proto.md: a server that does not know a client flag MUST close the
  // connection (run()'s error does; no option reply can be sent yet).
  if (flags & ~(kClientFlagFixedNewstyle | kClientFlagNoZeroes)) {
    char hex[16];
    std::snprintf(hex, sizeof hex, "0x%08x", static_cast<unsigned>(flags));
    co_return Error(EPROTO, std::string("client flags ") + hex + " set bits this server does not know");
  }
  no_zeroes_ = (flags & kClientFlagNoZeroes) != 0;
  co_return ok_status();
}

// NBD_OPT_LIST: the one export, then ACK.
Task<Status> Negotiation::list(const std::vector<std::byte>& data) {
  if (!data.empty()) co_return co_await reply_error(kOptList, kRepErrInvalid, "LIST takes no data");
  std::vector<std::byte> entry(4 + exp_.name.size());
  store_be32(entry.data(), static_cast<uint32_t>(exp_.name.size()));
  std::memcpy(entry.data() + 4, exp_.name.data(), exp_.name.size());
  UQ_CO_TRY(co_await reply(kOptList, kRepServer, entry));
  co_return co_await reply(kOptList, kRepAck);
}

Task<Result<Negotiated>> Negotiation::run() {
  UQ_CO_TRY(co_await greet());

  for (;;) {
    std::byte raw[OptionHeader::kSize];
    UQ_CO_TRY(co_await recv_exact(fd_, raw, sizeof raw));
    OptionHeader h = OptionHeader::load(raw);
    if (h.magic != kOptionMagic) co_return Error(EPROTO, "bad option magic");
    // An oversized option cannot be skipped cheaply; the spec lets the
    // server drop the connection.
    if (h.length > kMaxOptionLength) co_return Error(EPROTO, "option data too long");
    std::vector<std::byte> data(h.length);
    UQ_CO_TRY(co_await recv_exact(fd_, data.data(), data.size()));

    bool go_done = false;
    switch (h.option) {
      case kOptExportName: {
        std::string name(reinterpret_cast<const char*>(data.data()), data.size());
        if (name != exp_.name) co_return Error(ENOENT, "client asked for an unknown export");
        UQ_CO_TRY(co_await export_name_reply());
        co_return result_;
      }
      case kOptAbort: {
        Status ignored = co_await reply(h.option, kRepAck);  // the client may be gone already
        (void)ignored;
        co_return Error(ECONNABORTED, "client aborted the handshake");
      }
      case kOptList:
        UQ_CO_TRY(co_await list(data));
        break;
      case kOptInfo:
      case kOptGo:
        UQ_CO_TRY(co_await info_or_go(h.option, data, &go_done));
        if (go_done) co_return result_;
        break;
      case kOptStructuredReply:
        if (!data.empty()) {
          UQ_CO_TRY(co_await reply_error(h.option, kRepErrInvalid, "STRUCTURED_REPLY takes no data"));
          break;
        }
        result_.structured_replies = true;
        UQ_CO_TRY(co_await reply(h.option, kRepAck));
        break;
      case kOptListMetaContext:
      case kOptSetMetaContext:
        UQ_CO_TRY(co_await meta_context(h.option, data));
        break;
      default:
        UQ_CO_TRY(co_await reply_error(h.option, kRepErrUnsup, "option not supported"));
        break;
    }
  }
}

}  // namespace

uint16_t Export::transmission_flags(bool structured_replies) const {
  // CAN_MULTI_CONN: every connection shares one Disk, so a flush on any of
  // them covers the writes completed on all of them. SEND_DF: a READ is
  // always answered in one chunk (Session::do_read), so DF costs nothing.
  uint16_t flags = kFlagHasFlags | kFlagSendFlush | kFlagSendFua | kFlagCanMultiConn | kFlagSendCache;
  if (structured_replies) flags |= kFlagSendDf;
  if (read_only) return flags | kFlagReadOnly;
  return flags | kFlagSendTrim | kFlagSendWriteZeroes;
}

Task<Result<Negotiated>> negotiate(int fd, const Export& exp) {
  Negotiation n(fd, exp);
  co_return co_await n.run();
}

}  // namespace uqcow::nbd
