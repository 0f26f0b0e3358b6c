// The NBD wire protocol (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md):
// constants, and the big-endian structures the server reads and writes. Every
// multi-byte field is loaded and stored here, nowhere else.
#pragma once

#include <cstddef>
#include <cstdint>

#include "block/endian.h"

namespace uqcow::nbd {

// Handshake.
constexpr uint64_t kNbdMagic = 0x4e42444d41474943ull;   // "NBDMAGIC"
constexpr uint64_t kOptionMagic = 0x49484156454f5054ull;  // "IHAVEOPT"
constexpr uint64_t kOptionReplyMagic = 0x3e889045565a9ull;
constexpr uint16_t kFlagFixedNewstyle = 1 << 0;
constexpr uint16_t kFlagNoZeroes = 1 << 1;
// Client flags (the 32 bits the client answers the greeting with).
constexpr uint32_t kClientFlagFixedNewstyle = 1 << 0;
constexpr uint32_t kClientFlagNoZeroes = 1 << 1;

// Transmission flags (per export).
constexpr uint16_t kFlagHasFlags = 1 << 0;
constexpr uint16_t kFlagReadOnly = 1 << 1;
constexpr uint16_t kFlagSendFlush = 1 << 2;
constexpr uint16_t kFlagSendFua = 1 << 3;
constexpr uint16_t kFlagSendTrim = 1 << 5;
constexpr uint16_t kFlagSendWriteZeroes = 1 << 6;
constexpr uint16_t kFlagSendDf = 1 << 7;
constexpr uint16_t kFlagCanMultiConn = 1 << 8;
constexpr uint16_t kFlagSendCache = 1 << 10;

// Options.
constexpr uint32_t kOptExportName = 1;
constexpr uint32_t kOptAbort = 2;
constexpr uint32_t kOptList = 3;
constexpr uint32_t kOptInfo = 6;
constexpr uint32_t kOptGo = 7;
constexpr uint32_t kOptStructuredReply = 8;
constexpr uint32_t kOptListMetaContext = 9;
constexpr uint32_t kOptSetMetaContext = 10;

// Option replies.
constexpr uint32_t kRepAck = 1;
constexpr uint32_t kRepServer = 2;
constexpr uint32_t kRepInfo = 3;
constexpr uint32_t kRepMetaContext = 4;
constexpr uint32_t kRepErrUnsup = 0x80000001u;
constexpr uint32_t kRepErrInvalid = 0x80000003u;
constexpr uint32_t kRepErrUnknown = 0x80000006u;

constexpr uint16_t kInfoExport = 0;
constexpr uint16_t kInfoBlockSize = 3;

// Transmission.
constexpr uint32_t kRequestMagic = 0x25609513u;
constexpr uint32_t kSimpleReplyMagic = 0x67446698u;
constexpr uint32_t kStructuredReplyMagic = 0x668e33efu;

enum Command : uint16_t {
  kCmdRead = 0,
  kCmdWrite = 1,
  kCmdDisc = 2,
  kCmdFlush = 3,
  kCmdTrim = 4,
  kCmdCache = 5,
  kCmdWriteZeroes = 6,
  kCmdBlockStatus = 7,
};
constexpr uint16_t kCmdFlagFua = 1 << 0;
constexpr uint16_t kCmdFlagNoHole = 1 << 1;
constexpr uint16_t kCmdFlagDf = 1 << 2;
constexpr uint16_t kCmdFlagReqOne = 1 << 3;

constexpr uint16_t kReplyFlagDone = 1 << 0;
constexpr uint16_t kReplyTypeNone = 0;
constexpr uint16_t kReplyTypeOffsetData = 1;
constexpr uint16_t kReplyTypeBlockStatus = 5;
constexpr uint16_t kReplyTypeError = 0x8001;

// base:allocation states.
constexpr uint32_t kStateHole = 1 << 0;
constexpr uint32_t kStateZero = 1 << 1;
// qemu:dirty-bitmap:NAME state (qemu's NBD_STATE_DIRTY); qemu:allocation-depth
// descriptors carry the depth itself.
constexpr uint32_t kStateDirty = 1 << 0;

// NBD error numbers (the protocol's own, equal to Linux's for these).
constexpr uint32_t kEperm = 1, kEio = 5, kEnomem = 12, kEinval = 22, kEnospc = 28,
                   kEoverflow = 75, kEnotsup = 95, kEshutdown = 108;
uint32_t to_nbd_error(int errno_value);

// Metadata contexts, and the ids SET_META_CONTEXT hands out for them (qemu-
// nbd's: the bitmap exported i-th gets kDirtyBitmapId + i; LIST answers id 0).
constexpr char kBaseAllocation[] = "base:allocation";
constexpr char kAllocationDepth[] = "qemu:allocation-depth";
constexpr char kDirtyBitmapPrefix[] = "qemu:dirty-bitmap:";
constexpr uint32_t kBaseAllocationId = 0;
constexpr uint32_t kAllocationDepthId = 1;
constexpr uint32_t kDirtyBitmapId = 2;

// Longest string (export name, context query or name) the server reads
// (proto.md and qemu's NBD_MAX_STRING_SIZE).
constexpr uint32_t kMaxStringSize = 4096;

// Block sizes advertised with NBD_INFO_BLOCK_SIZE; kMaxPayload also bounds
// every request's length.
constexpr uint32_t kMinBlockSize = 1;
constexpr uint32_t kPreferredBlockSize = 4096;
constexpr uint32_t kMaxPayload = 32u << 20;

// Option header sent by the client: magic, option, data length.
struct OptionHeader {
  static constexpr size_t kSize = 16;
  uint64_t magic;
  uint32_t option;
  uint32_t length;
  static OptionHeader load(const std::byte* p) {
    return {load_be64(p), load_be32(p + 8), load_be32(p + 12)};
  }
};

// Option reply header; `length` bytes of data follow.
struct OptionReplyHeader {
  static constexpr size_t kSize = 20;
  uint32_t option;
  uint32_t type;
  uint32_t length;
  void store(std::byte* p) const {
    store_be64(p, kOptionReplyMagic);
    store_be32(p + 8, option);
    store_be32(p + 12, type);
    store_be32(p + 16, length);
  }
};

struct Request {
  static constexpr size_t kSize = 28;
  uint32_t magic;
  uint16_t flags;
  uint16_t type;
  uint64_t handle;
  uint64_t offset;
  uint32_t length;
  static Request load(const std::byte* p) {
    return {load_be32(p), load_be16(p + 4), load_be16(p + 6), load_be64(p + 8),
            load_be64(p + 16), load_be32(p + 24)};
  }
};

struct SimpleReply {
  static constexpr size_t kSize = 16;
  uint32_t error;
  uint64_t handle;
  void store(std::byte* p) const {
    store_be32(p, kSimpleReplyMagic);
    store_be32(p + 4, error);
    store_be64(p + 8, handle);
  }
};

// Structured reply chunk header; `length` bytes of payload follow.
struct ChunkHeader {
  static constexpr size_t kSize = 20;
  uint16_t flags;
  uint16_t type;
  uint64_t handle;
  uint32_t length;
  void store(std::byte* p) const {
    store_be32(p, kStructuredReplyMagic);
    store_be16(p + 4, flags);
    store_be16(p + 6, type);
    store_be64(p + 8, handle);
    store_be32(p + 16, length);
  }
};

}  // namespace uqcow::nbd
