// One NBD client connection: the fixed-newstyle handshake (negotiation.cc)
// and the transmission phase (session.cc).
#pragma once

#include <cstdint>
#include <string>

#include "block/disk.h"
#include "engine/result.h"
#include "engine/task.h"
#include "nbd/meta_context.h"

namespace uqcow::nbd {

// What the server exports: one Disk under one name, and the metadata
// contexts it offers besides base:allocation.
struct Export {
  std::string name;
  Disk* disk = nullptr;
  bool read_only = false;
  OfferedContexts contexts;
  // The flags sent with the export; DF only once structured replies are
  // negotiated (proto.md).
  uint16_t transmission_flags(bool structured_replies) const;
};

// What the handshake agreed on.
struct Negotiated {
  bool structured_replies = false;
  // The last SET_META_CONTEXT's selection; NBD_CMD_BLOCK_STATUS may be used
  // when it is not empty, and answers one chunk per context in it.
  MetaContexts contexts;
};

// Runs the option haggling on `fd` until NBD_OPT_GO / NBD_OPT_EXPORT_NAME
// selects the export. An error (peer gone, NBD_OPT_ABORT, unknown export
// with EXPORT_NAME, malformed option) means: close the connection.
Task<Result<Negotiated>> negotiate(int fd, const Export& exp);

// Serves requests on `fd` until NBD_CMD_DISC, the peer closes, or a protocol
// violation; every request in flight has been answered (or its reply has
// failed) when it returns. Does not close `fd`.
Task<void> serve_transmission(int fd, const Export& exp, Negotiated negotiated);

}  // namespace uqcow::nbd
