// One NBD session in-process: negotiate() and serve_transmission() run on a
// reactor in a server thread over one end of a socketpair, as nbd::Server
// runs them for an accepted client, and the test body drives a blocking
// client (nbd/test_client.h) on the other end. The oracles are an in-memory
// model of the export for data, and for the protocol the rules of proto.md
// that the client checks on every reply (it shares no code with nbd/).
#include "nbd/session.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "block/endian.h"
#include "block/open.h"
#include "engine/sync_wait.h"
#include "nbd/test_client.h"
#include "qcow2/create.h"
#include "uring/file_desc.h"
#include "uring/reactor.h"

namespace uqcow::nbd {
namespace {

using testing::Bytes;
using testing::Client;
using testing::ExportInfo;
using testing::Reply;
namespace wire = testing::wire;

constexpr uint64_t kCluster = 64 * 1024;  // qcow2's default cluster size
constexpr uint64_t kSize = 16 * kCluster;
constexpr char kExportName[] = "disk";

// ---- the server side -------------------------------------------------------

struct ServerConfig {
  std::string path;
  bool qcow2 = true;  // else a raw file
  bool read_only = false;
};

// What the server side did, for the test to check after the session.
struct ServerOutcome {
  Status setup;       // creating and opening the image
  Status negotiation; // negotiate()'s error, when it failed
  std::optional<Negotiated> negotiated;
  bool transmission_returned = false;
  Bytes contents;     // the export after the session, read through its Disk
  Status closed;
};

Task<Status> create_image_file(const ServerConfig& config) {
  if (config.qcow2) {
    // A named variable, not a temporary inside the co_await expression:
    // GCC 12 destroys such a temporary wrongly (free(): invalid pointer).
    const qcow2::CreateOptions options{.size = kSize};
    co_return co_await qcow2::create_image(config.path, options);
  }
  FileDesc fd(::open(config.path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd.valid() || ::ftruncate(fd.get(), kSize) != 0) co_return errno_error(errno, "create " + config.path);
  co_return ok_status();
}

Task<void> serve_one(int fd, ServerConfig config, ServerOutcome* out) {
  out->setup = co_await create_image_file(config);
  if (!out->setup.ok()) co_return;
  const OpenOptions options{.read_only = config.read_only, .format = config.qcow2 ? "qcow2" : "raw"};
  auto disk = co_await open_disk(config.path, options);
  if (!disk.ok()) {
    out->setup = std::move(disk).error();
    co_return;
  }
  Export exp{kExportName, disk->get(), config.read_only};
  auto negotiated = co_await negotiate(fd, exp);
  if (negotiated.ok()) {
    out->negotiated = *negotiated;
    co_await serve_transmission(fd, exp, *negotiated);
    out->transmission_returned = true;
  } else {
    out->negotiation = std::move(negotiated).error();
  }
  out->contents.resize(kSize);
  Status read = co_await (*disk)->read(0, std::as_writable_bytes(std::span(out->contents)));
  if (!read.ok()) out->contents.clear();
  out->closed = co_await (*disk)->close();
}

// The server side of one connection, on its own thread and reactor. It owns
// its end of the socketpair and closes it when the session is over (as
// nbd::Server does), so the client then sees EOF.
class ServerThread {
 public:
  ServerThread(FileDesc fd, ServerConfig config)
      : thread_([this, fd = std::move(fd), config = std::move(config)]() mutable {
          run(std::move(fd), config);
        }) {}
  ~ServerThread() {
    if (thread_.joinable()) thread_.join();
  }
  ServerOutcome join() {
    thread_.join();
    return std::move(outcome_);
  }

 private:
  void run(FileDesc fd, const ServerConfig& config) {
    auto reactor = uring::Reactor::create();
    if (!reactor.ok()) {
      outcome_.setup = reactor.error();
      return;
    }
    sync_wait(**reactor, serve_one(fd.get(), config, &outcome_));
  }

  ServerOutcome outcome_;
  std::thread thread_;  // declared last: starts once outcome_ exists
};

// ---- the oracle --------------------------------------------------------------

// Bytes that depend on their export offset and a seed, never zero (so that
// data is never mistaken for zeros).
Bytes pattern(uint64_t offset, size_t len, uint32_t seed) {
  Bytes b(len);
  for (size_t i = 0; i < len; ++i) {
    uint64_t x = (offset + i + 1) * 0x9E3779B97F4A7C15ull ^ (uint64_t{seed} << 40);
    b[i] = static_cast<uint8_t>((x >> 29) % 255 + 1);
  }
  return b;
}

// The export as the client has written it.
class Model {
 public:
  Model() : bytes_(kSize, 0) {}
  void write(uint64_t offset, const Bytes& data) {
    if (inside(offset, data.size())) std::copy(data.begin(), data.end(), bytes_.begin() + offset);
  }
  void zero(uint64_t offset, uint64_t len) {
    if (inside(offset, len)) std::fill_n(bytes_.begin() + offset, len, 0);
  }
  Bytes read(uint64_t offset, uint64_t len) const {
    if (!inside(offset, len)) return {};
    return Bytes(bytes_.begin() + offset, bytes_.begin() + offset + len);
  }
  const Bytes& all() const { return bytes_; }

 private:
  // A range past the export is a mistake of the test itself.
  static bool inside(uint64_t offset, uint64_t len) {
    if (offset <= kSize && len <= kSize - offset) return true;
    ADD_FAILURE() << "the test's model has no range " << offset << "+" << len;
    return false;
  }
  Bytes bytes_;
};

// Compares byte strings; on a mismatch names the first differing offset
// (plus `base`) instead of dumping both.
::testing::AssertionResult SameBytes(const Bytes& got, const Bytes& want, uint64_t base = 0) {
  if (got == want) return ::testing::AssertionSuccess();
  size_t i = 0;
  while (i < got.size() && i < want.size() && got[i] == want[i]) ++i;
  auto failure = ::testing::AssertionFailure() << "got " << got.size() << " bytes, want " << want.size();
  if (i < got.size() && i < want.size()) {
    failure << "; first difference at offset " << base + i << ": got " << int{got[i]} << ", want " << int{want[i]};
  }
  return failure;
}

// The reply arrived, valid, and without an error.
::testing::AssertionResult Ok(const std::optional<Reply>& r, const Client& c) {
  if (!r) return ::testing::AssertionFailure() << "no valid reply: " << c.error();
  if (r->error != 0) return ::testing::AssertionFailure() << "NBD error " << r->error << ": " << r->message;
  return ::testing::AssertionSuccess();
}

// The reply arrived, valid, with NBD error `error`.
::testing::AssertionResult Failed(const std::optional<Reply>& r, const Client& c, uint32_t error) {
  if (!r) return ::testing::AssertionFailure() << "no valid reply: " << c.error();
  if (r->error != error) return ::testing::AssertionFailure() << "NBD error " << r->error << ", want " << error;
  return ::testing::AssertionSuccess();
}

// ---- the fixture ---------------------------------------------------------------

class SessionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TEST_TMPDIR");
    dir_ = std::string(tmp && *tmp ? tmp : "/tmp") + "/nbd_session_XXXXXX";
    ASSERT_NE(::mkdtemp(dir_.data()), nullptr) << dir_;
  }
  void TearDown() override {
    if (server_) finish();
    ::unlink((dir_ + "/image").c_str());
    ::rmdir(dir_.c_str());
  }

  // Starts the server on a fresh image; client() is the other end.
  void start(bool qcow2 = true, bool read_only = false) {
    int fds[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0) << std::strerror(errno);
    client_fd_.reset(fds[1]);
    client_ = std::make_unique<Client>(fds[1]);
    server_ = std::make_unique<ServerThread>(FileDesc(fds[0]), ServerConfig{dir_ + "/image", qcow2, read_only});
  }
  // start() and the usual handshake (structured replies, base:allocation, GO).
  void connect(bool read_only = false) {
    ASSERT_NO_FATAL_FAILURE(start(true, read_only));
    auto info = client().handshake(kExportName);
    ASSERT_TRUE(info) << client().error();
    ASSERT_EQ(info->size, kSize);
    info_ = *info;
  }
  Client& client() { return *client_; }

  // NBD_CMD_DISC (no reply), then the server must close the connection.
  void disconnect() {
    ASSERT_TRUE(client().send_raw_request(wire::kRequestMagic, wire::kCmdDisc, 0, 0)) << client().error();
    EXPECT_TRUE(client().closed_by_server()) << client().error();
  }

  // Closes the client's end (a session still running sees EOF) and waits
  // for the server.
  ServerOutcome finish() {
    client_fd_.reset();
    ServerOutcome out = server_->join();
    server_.reset();
    EXPECT_TRUE(out.setup.ok()) << out.setup.message();
    EXPECT_TRUE(out.closed.ok()) << out.closed.message();
    return out;
  }

  // The whole export and a few unaligned ranges read back as `model` holds.
  void expect_reads_match(const Model& model) {
    auto all = client().read(0, kSize);
    ASSERT_TRUE(Ok(all, client()));
    EXPECT_TRUE(SameBytes(all->data, model.all()));
    const std::pair<uint64_t, uint32_t> ranges[] = {{0, 1}, {4095, 3}, {kCluster - 1, 2}, {kSize - 1, 1}};
    for (auto [offset, len] : ranges) {
      auto r = client().read(offset, len);
      ASSERT_TRUE(Ok(r, client()));
      EXPECT_TRUE(SameBytes(r->data, model.read(offset, len), offset));
    }
  }

  std::string dir_;
  FileDesc client_fd_;
  std::unique_ptr<Client> client_;
  std::unique_ptr<ServerThread> server_;
  ExportInfo info_;
};

// ---- handshake ---------------------------------------------------------------

TEST_F(SessionTest, GoAdvertisesTheExportAndEntersTransmission) {
  ASSERT_NO_FATAL_FAILURE(start());
  Client& c = client();
  auto flags = c.greeting();
  ASSERT_TRUE(flags) << c.error();
  EXPECT_TRUE(*flags & wire::kFlagFixedNewstyle);
  ASSERT_TRUE(c.send_client_flags(wire::kClientFixedNewstyle | (*flags & wire::kFlagNoZeroes)));
  ASSERT_TRUE(c.negotiate_structured_replies()) << c.error();
  ASSERT_TRUE(c.select_base_allocation(kExportName)) << c.error();
  ExportInfo info;
  auto refused = c.go(kExportName, &info);
  ASSERT_TRUE(refused) << c.error();
  ASSERT_EQ(*refused, 0u);

  EXPECT_EQ(info.size, kSize);
  EXPECT_TRUE(info.flags & wire::kFlagHasFlags);
  EXPECT_FALSE(info.flags & wire::kFlagReadOnly);
  for (uint16_t f : {wire::kFlagSendFlush, wire::kFlagSendFua, wire::kFlagSendTrim, wire::kFlagSendWriteZeroes,
                     wire::kFlagSendCache, wire::kFlagSendDf}) {
    EXPECT_TRUE(info.flags & f) << "transmission flags " << info.flags << " lack " << f;
  }
  if (info.block_sizes) {
    auto [min, preferred, max] = *info.block_sizes;
    EXPECT_TRUE(std::has_single_bit(min) && min <= 65536) << "minimum block size " << min;
    EXPECT_TRUE(std::has_single_bit(preferred) && preferred >= std::max(min, 512u)) << "preferred " << preferred;
    EXPECT_TRUE(max % min == 0 && max >= preferred) << "maximum " << max;
  }

  // Transmission with what was negotiated: a FLUSH, and BLOCK_STATUS of
  // the fresh image (one hole reading as zeros).
  EXPECT_TRUE(Ok(c.call(wire::kCmdFlush, 0, 0), c));
  auto status = c.call(wire::kCmdBlockStatus, 0, kSize);
  ASSERT_TRUE(Ok(status, c));
  EXPECT_EQ(status->context, c.base_allocation_id());
  using Extents = std::vector<std::pair<uint32_t, uint32_t>>;
  EXPECT_EQ(status->extents, (Extents{{kSize, wire::kStateHole | wire::kStateZero}}));
  ASSERT_NO_FATAL_FAILURE(disconnect());

  ServerOutcome out = finish();
  ASSERT_TRUE(out.negotiated) << out.negotiation.message();
  EXPECT_TRUE(out.negotiated->structured_replies);
  EXPECT_TRUE(out.negotiated->base_allocation);
  EXPECT_TRUE(out.transmission_returned);
}

TEST_F(SessionTest, UnknownOptionsAreRefusedAndTheHandshakeGoesOn) {
  ASSERT_NO_FATAL_FAILURE(start());
  Client& c = client();
  ASSERT_TRUE(c.greeting()) << c.error();
  ASSERT_TRUE(c.send_client_flags(wire::kClientFixedNewstyle | wire::kClientNoZeroes));

  ASSERT_TRUE(c.send_option(0x7fff1234, Bytes{1, 2, 3, 4, 5}));
  auto unknown = c.option_reply(0x7fff1234);
  ASSERT_TRUE(unknown) << c.error();
  EXPECT_EQ(unknown->type, wire::kRepErrUnsup);
  // A server without TLS answers STARTTLS with an error (NOTLS mode).
  ASSERT_TRUE(c.send_option(wire::kOptStartTls));
  auto tls = c.option_reply(wire::kOptStartTls);
  ASSERT_TRUE(tls) << c.error();
  EXPECT_TRUE(tls->type == wire::kRepErrUnsup || tls->type == wire::kRepErrPolicy) << tls->type;
  ExportInfo info;
  auto refused = c.go("no-such-export", &info);
  ASSERT_TRUE(refused) << c.error();
  EXPECT_EQ(*refused, wire::kRepErrUnknown);

  // Still haggling: structured replies, then GO, but no metadata context.
  ASSERT_TRUE(c.negotiate_structured_replies()) << c.error();
  refused = c.go(kExportName, &info);
  ASSERT_TRUE(refused) << c.error();
  ASSERT_EQ(*refused, 0u);
  EXPECT_EQ(info.size, kSize);
  EXPECT_TRUE(Failed(c.call(wire::kCmdBlockStatus, 0, 4096), c, wire::kEinval)) << "no context was selected";
  auto r = c.read(0, 4096);
  ASSERT_TRUE(Ok(r, c));
  EXPECT_TRUE(SameBytes(r->data, Bytes(4096, 0)));
  ASSERT_NO_FATAL_FAILURE(disconnect());

  ServerOutcome out = finish();
  ASSERT_TRUE(out.negotiated);
  EXPECT_FALSE(out.negotiated->base_allocation);
  EXPECT_TRUE(out.transmission_returned);
}

// proto.md: a server that does not know a client flag closes the
// connection; there is no way to refuse it with a reply.
TEST_F(SessionTest, UnknownClientFlagsCloseTheConnection) {
  ASSERT_NO_FATAL_FAILURE(start());
  Client& c = client();
  ASSERT_TRUE(c.greeting()) << c.error();
  ASSERT_TRUE(c.send_client_flags(wire::kClientFixedNewstyle | (1u << 5)));
  EXPECT_TRUE(c.closed_by_server()) << c.error();

  ServerOutcome out = finish();
  EXPECT_FALSE(out.negotiated);
  EXPECT_NE(out.negotiation.message().find("client flags 0x00000021"), std::string::npos)
      << out.negotiation.message();
  EXPECT_FALSE(out.transmission_returned);
}

TEST_F(SessionTest, AbortEndsTheSessionWithoutTransmission) {
  ASSERT_NO_FATAL_FAILURE(start());
  Client& c = client();
  ASSERT_TRUE(c.greeting()) << c.error();
  ASSERT_TRUE(c.send_client_flags(wire::kClientFixedNewstyle | wire::kClientNoZeroes));
  ASSERT_TRUE(c.negotiate_structured_replies()) << c.error();
  ASSERT_TRUE(c.send_option(wire::kOptAbort));
  auto ack = c.option_reply(wire::kOptAbort);
  ASSERT_TRUE(ack) << c.error();
  EXPECT_EQ(ack->type, wire::kRepAck);
  EXPECT_TRUE(c.closed_by_server()) << c.error();

  ServerOutcome out = finish();
  EXPECT_FALSE(out.negotiated);
  EXPECT_FALSE(out.negotiation.ok());
  EXPECT_FALSE(out.transmission_returned);
}

TEST_F(SessionTest, ReadOnlyExportSaysSoAndRefusesEveryWrite) {
  ASSERT_NO_FATAL_FAILURE(connect(/*read_only=*/true));
  Client& c = client();
  EXPECT_TRUE(info_.flags & wire::kFlagReadOnly);
  // The refused WRITE's payload is consumed: the requests after it are
  // still read in step.
  EXPECT_TRUE(Failed(c.write(0, pattern(0, 4096, 1)), c, wire::kEperm));
  EXPECT_TRUE(Failed(c.call(wire::kCmdTrim, 0, kCluster), c, wire::kEperm));
  EXPECT_TRUE(Failed(c.call(wire::kCmdWriteZeroes, 0, 4096), c, wire::kEperm));
  EXPECT_TRUE(Ok(c.call(wire::kCmdFlush, 0, 0), c));
  ASSERT_NO_FATAL_FAILURE(expect_reads_match(Model()));
  ASSERT_NO_FATAL_FAILURE(disconnect());
  EXPECT_TRUE(SameBytes(finish().contents, Model().all()));
}

// NBD_OPT_EXPORT_NAME, without NO_ZEROES and without structured replies:
// the reply is size, flags and 124 zero bytes, and every reply after it is a
// simple one (a READ's data follows its header; an error carries none).
TEST_F(SessionTest, ExportNameWithSimpleRepliesOverARawFile) {
  ASSERT_NO_FATAL_FAILURE(start(/*qcow2=*/false));
  Client& c = client();
  ASSERT_TRUE(c.greeting()) << c.error();
  ASSERT_TRUE(c.send_client_flags(wire::kClientFixedNewstyle));
  std::string name = kExportName;
  ASSERT_TRUE(c.send_option(wire::kOptExportName, Bytes(name.begin(), name.end())));
  Bytes reply;
  ASSERT_TRUE(c.recv(8 + 2 + 124, &reply)) << c.error();
  EXPECT_EQ(load_be64(reply.data()), kSize);
  EXPECT_TRUE(load_be16(reply.data() + 8) & wire::kFlagHasFlags);
  EXPECT_FALSE(load_be16(reply.data() + 8) & wire::kFlagSendDf) << "DF needs structured replies";
  EXPECT_TRUE(std::all_of(reply.begin() + 10, reply.end(), [](uint8_t b) { return b == 0; }));

  Model m;
  Bytes data = pattern(1000, 5000, 7);
  ASSERT_TRUE(Ok(c.write(1000, data), c));
  m.write(1000, data);
  EXPECT_TRUE(Failed(c.read(kSize - 100, 200), c, wire::kEinval));
  EXPECT_TRUE(Failed(c.call(wire::kCmdRead, 0, 4096, wire::kCmdFlagDf), c, wire::kEinval)) << "DF not advertised";
  ASSERT_NO_FATAL_FAILURE(expect_reads_match(m));
  ASSERT_NO_FATAL_FAILURE(disconnect());
  ServerOutcome out = finish();
  ASSERT_TRUE(out.negotiated);
  EXPECT_FALSE(out.negotiated->structured_replies);
  EXPECT_TRUE(SameBytes(out.contents, m.all()));
}

// ---- transmission ----------------------------------------------------------

TEST_F(SessionTest, WritesZeroesTrimsAndFlushesReadBackAsTheModel) {
  ASSERT_NO_FATAL_FAILURE(connect());
  Client& c = client();
  Model m;
  auto write = [&](uint64_t offset, size_t len, uint32_t seed, uint16_t flags = 0) {
    Bytes data = pattern(offset, len, seed);
    EXPECT_TRUE(Ok(c.write(offset, data, flags), c)) << "write at " << offset;
    m.write(offset, data);
  };
  auto zero = [&](uint16_t command, uint64_t offset, uint32_t len, uint16_t flags = 0) {
    EXPECT_TRUE(Ok(c.call(command, offset, len, flags), c)) << "command " << command << " at " << offset;
    m.zero(offset, len);
  };
  write(0x1000, 0x3000, 1);
  write(kCluster - 1000, 5000, 2);                      // across a cluster boundary
  write(5 * kCluster + 123, 70000, 3, wire::kCmdFlagFua);
  ASSERT_NO_FATAL_FAILURE(expect_reads_match(m));

  zero(wire::kCmdWriteZeroes, 0x1800, 0x800);           // inside data; may unmap
  zero(wire::kCmdWriteZeroes, 5 * kCluster + 1000, 20000, wire::kCmdFlagNoHole);
  // TRIM promises nothing about what reads return; this server, on a qcow2
  // v3 image without a backing file, makes whole clusters read as zeros.
  write(10 * kCluster, kCluster, 4);
  zero(wire::kCmdTrim, 10 * kCluster, kCluster);
  EXPECT_TRUE(Ok(c.call(wire::kCmdFlush, 0, 0), c));
  ASSERT_NO_FATAL_FAILURE(expect_reads_match(m));

  write(kSize - 10, 10, 5);                              // the last bytes
  write(0x1000, 0x100, 6);                               // over earlier data
  ASSERT_NO_FATAL_FAILURE(expect_reads_match(m));
  ASSERT_NO_FATAL_FAILURE(disconnect());
  EXPECT_TRUE(SameBytes(finish().contents, m.all()));
}

// The base:allocation map of the whole export, one status per byte, from
// BLOCK_STATUS requests that each start where the last reply ended.
std::optional<std::vector<uint8_t>> status_map(Client& c) {
  std::vector<uint8_t> map(kSize);
  uint64_t offset = 0;
  while (offset < kSize) {
    auto r = c.call(wire::kCmdBlockStatus, offset, static_cast<uint32_t>(kSize - offset));
    EXPECT_TRUE(Ok(r, c)) << "BLOCK_STATUS at " << offset;
    if (!r || r->error != 0) return std::nullopt;
    for (size_t i = 0; i < r->extents.size(); ++i) {
      auto [len, flags] = r->extents[i];
      if (i > 0) {
        EXPECT_NE(flags, r->extents[i - 1].second) << "equal neighbours at " << offset;
      }
      std::fill_n(map.begin() + offset, len, static_cast<uint8_t>(flags));
      offset += len;
    }
  }
  return map;
}

// Data, zeros written with and without NO_HOLE, a trimmed cluster and
// untouched clusters each report the state they must. Soundness first:
// wherever ZERO is reported, the model holds zeros.
TEST_F(SessionTest, BlockStatusReportsDataZerosAndHolesAsWritten) {
  ASSERT_NO_FATAL_FAILURE(connect());
  Client& c = client();
  Model m;
  auto write = [&](uint64_t offset, size_t len, uint32_t seed) {
    Bytes data = pattern(offset, len, seed);
    EXPECT_TRUE(Ok(c.write(offset, data), c));
    m.write(offset, data);
  };
  auto zero = [&](uint16_t command, uint64_t cluster, uint16_t flags = 0) {
    EXPECT_TRUE(Ok(c.call(command, cluster * kCluster, kCluster, flags), c));
    m.zero(cluster * kCluster, kCluster);
  };
  write(1 * kCluster, kCluster, 1);
  write(2 * kCluster + 512, 4096, 2);
  zero(wire::kCmdWriteZeroes, 4);
  write(6 * kCluster, kCluster, 3);
  zero(wire::kCmdWriteZeroes, 6, wire::kCmdFlagNoHole);
  write(8 * kCluster, kCluster, 4);
  zero(wire::kCmdTrim, 8);

  auto map = status_map(c);
  ASSERT_TRUE(map);
  auto state = [&](uint64_t offset) { return uint32_t{(*map)[offset]}; };
  for (uint64_t offset = 0; offset < kSize; ++offset) {
    if ((state(offset) & wire::kStateZero) && m.all()[offset] != 0) {
      FAIL() << "ZERO reported at " << offset << ", which holds data";
    }
  }
  auto expect_range = [&](uint64_t offset, uint64_t len, uint32_t must_set, uint32_t must_clear) {
    for (uint64_t o = offset; o < offset + len; ++o) {
      if ((state(o) & must_set) != must_set || (state(o) & must_clear) != 0) {
        ADD_FAILURE() << "state " << state(o) << " at " << o << ", want bits " << must_set << " set and "
                      << must_clear << " clear";
        return;
      }
    }
  };
  constexpr uint32_t kHole = wire::kStateHole, kZero = wire::kStateZero;
  expect_range(1 * kCluster, kCluster, 0, kHole | kZero);  // data
  expect_range(2 * kCluster + 512, 4096, 0, kHole | kZero);
  expect_range(4 * kCluster, kCluster, kZero, 0);          // zeroed, may be unmapped
  expect_range(6 * kCluster, kCluster, kZero, kHole);      // NO_HOLE: stays allocated
  expect_range(8 * kCluster, kCluster, kHole, 0);          // trimmed
  for (uint64_t cluster : {0, 3, 5, 7, 9, 10, 11, 12, 13, 14, 15}) {
    expect_range(cluster * kCluster, kCluster, kHole | kZero, 0);  // never written
  }

  // REQ_ONE: one descriptor, from the offset asked, no longer than the
  // state there lasts (the client checks there is exactly one).
  auto one = c.call(wire::kCmdBlockStatus, kCluster / 2, 3 * kCluster, wire::kCmdFlagReqOne);
  ASSERT_TRUE(Ok(one, c));
  EXPECT_EQ(one->extents.at(0).second, kHole | kZero);
  EXPECT_LE(one->extents.at(0).first, kCluster / 2);
  // An unaligned query inside data.
  auto inside = c.call(wire::kCmdBlockStatus, kCluster + 100, 1000);
  ASSERT_TRUE(Ok(inside, c));
  for (auto [len, flags] : inside->extents) EXPECT_EQ(flags, 0u) << "extent of " << len;
  ASSERT_NO_FATAL_FAILURE(disconnect());
  EXPECT_TRUE(SameBytes(finish().contents, m.all()));
}

// Requests sent back to back before any reply is read: each cookie gets
// exactly one reply, whatever the order, and reads return the model.
TEST_F(SessionTest, PipelinedRequestsAreEachAnsweredOnceByCookie) {
  ASSERT_NO_FATAL_FAILURE(connect());
  Client& c = client();
  Model m;
  // The first batch reads only [0, kReadArea), written before the batch, and
  // writes only after it: a read racing a write of the same batch could
  // return either.
  const uint64_t kReadArea = 4 * kCluster;
  Bytes area = pattern(0, kReadArea, 1);
  ASSERT_TRUE(Ok(c.write(0, area), c));
  m.write(0, area);

  std::map<uint64_t, std::pair<uint64_t, uint32_t>> reads;  // cookie -> range
  std::set<uint64_t> sent;
  std::vector<std::pair<uint64_t, Bytes>> writes;
  for (uint32_t i = 0; i < 16; ++i) {
    uint64_t offset = kReadArea + i * 20000 + (i * 37) % 512;
    Bytes data = pattern(offset, 9000 + i * 100, 10 + i);
    auto cookie = c.submit_write(offset, data, i % 5 == 0 ? wire::kCmdFlagFua : 0);
    ASSERT_TRUE(cookie) << c.error();
    sent.insert(*cookie);
    writes.emplace_back(offset, std::move(data));
    if (i % 4 == 3) {
      std::pair<uint64_t, uint32_t> range{(i / 4) * (kReadArea / 4) + 77, 30000};
      ASSERT_LE(range.first + range.second, kReadArea);
      auto read = c.submit(wire::kCmdRead, range.first, range.second);
      ASSERT_TRUE(read) << c.error();
      sent.insert(*read);
      reads[*read] = range;
    }
  }
  auto zeroes = c.submit(wire::kCmdWriteZeroes, 12 * kCluster + 100, 5000);
  auto flush = c.submit(wire::kCmdFlush, 0, 0);
  ASSERT_TRUE(zeroes && flush) << c.error();
  sent.insert({*zeroes, *flush});
  EXPECT_EQ(c.in_flight(), sent.size());

  auto replies = c.wait_all();
  ASSERT_TRUE(replies) << c.error();
  std::set<uint64_t> answered;
  for (auto& [cookie, reply] : *replies) {
    answered.insert(cookie);
    EXPECT_EQ(reply.error, 0u) << "cookie " << cookie << ": " << reply.message;
    if (auto it = reads.find(cookie); it != reads.end()) {
      auto [offset, len] = it->second;
      EXPECT_TRUE(SameBytes(reply.data, m.read(offset, len), offset));
    }
  }
  EXPECT_EQ(answered, sent);
  for (auto& [offset, data] : writes) m.write(offset, data);
  m.zero(12 * kCluster + 100, 5000);

  // Second batch: reads only, across everything written.
  std::map<uint64_t, std::pair<uint64_t, uint32_t>> batch;
  for (uint32_t i = 0; i < 24; ++i) {
    std::pair<uint64_t, uint32_t> range{i * (kSize / 24) + (i * 13) % 97, static_cast<uint32_t>(kSize / 24 - 100)};
    auto cookie = c.submit(wire::kCmdRead, range.first, range.second);
    ASSERT_TRUE(cookie) << c.error();
    batch[*cookie] = range;
  }
  replies = c.wait_all();
  ASSERT_TRUE(replies) << c.error();
  ASSERT_EQ(replies->size(), batch.size());
  for (auto& [cookie, range] : batch) {
    ASSERT_TRUE(replies->count(cookie)) << "no reply for cookie " << cookie;
    const Reply& r = replies->at(cookie);
    EXPECT_EQ(r.error, 0u) << r.message;
    EXPECT_TRUE(SameBytes(r.data, m.read(range.first, range.second), range.first));
  }
  ASSERT_NO_FATAL_FAILURE(disconnect());
  EXPECT_TRUE(SameBytes(finish().contents, m.all()));
}

// Requests past the end (or whose end overflows) get an error reply, change
// nothing, and leave the session in step. The protocol asks ENOSPC for a
// write past the end and EINVAL for a read or BLOCK_STATUS; this server
// answers WRITE_ZEROES like WRITE and TRIM like READ.
TEST_F(SessionTest, OutOfRangeRequestsAreRefusedAndTheSessionContinues) {
  ASSERT_NO_FATAL_FAILURE(connect());
  Client& c = client();
  EXPECT_TRUE(Failed(c.read(kSize - 512, 1024), c, wire::kEinval));
  EXPECT_TRUE(Failed(c.read(kSize, 1), c, wire::kEinval));
  EXPECT_TRUE(Failed(c.read(UINT64_MAX - 511, 1024), c, wire::kEinval)) << "offset + length overflows";
  EXPECT_TRUE(Failed(c.write(kSize - 100, pattern(kSize - 100, 200, 1)), c, wire::kEnospc));
  EXPECT_TRUE(Failed(c.call(wire::kCmdWriteZeroes, kSize, 4096), c, wire::kEnospc));
  EXPECT_TRUE(Failed(c.call(wire::kCmdTrim, kSize - 4096, 8192), c, wire::kEinval));
  EXPECT_TRUE(Failed(c.call(wire::kCmdBlockStatus, kSize - 512, 1024), c, wire::kEinval));
  EXPECT_TRUE(Failed(c.call(99, 0, 512), c, wire::kEinval)) << "unknown command";
  ASSERT_NO_FATAL_FAILURE(expect_reads_match(Model()));
  ASSERT_NO_FATAL_FAILURE(disconnect());
  EXPECT_TRUE(SameBytes(finish().contents, Model().all()));
}

// proto.md: a flag not valid for its command, or not advertised
// (FAST_ZERO), or undefined is refused with EINVAL, and nothing is done;
// FUA is valid on every command, DF on READ. The session goes on.
TEST_F(SessionTest, CommandFlagsNotValidForTheCommandAreRefused) {
  ASSERT_NO_FATAL_FAILURE(connect());
  Client& c = client();
  const uint16_t kFastZero = 1 << 4;
  Model m;
  EXPECT_TRUE(Failed(c.call(wire::kCmdRead, 0, 4096, wire::kCmdFlagNoHole), c, wire::kEinval));
  EXPECT_TRUE(Failed(c.write(0, pattern(0, 4096, 1), wire::kCmdFlagDf), c, wire::kEinval)) << "DF is for READ";
  EXPECT_TRUE(Failed(c.write(0, pattern(0, 4096, 1), wire::kCmdFlagReqOne), c, wire::kEinval));
  EXPECT_TRUE(Failed(c.call(wire::kCmdWriteZeroes, 0, 4096, kFastZero), c, wire::kEinval))
      << "FAST_ZERO is not advertised";
  EXPECT_TRUE(Failed(c.call(wire::kCmdFlush, 0, 0, 1 << 15), c, wire::kEinval)) << "undefined bit";
  ASSERT_NO_FATAL_FAILURE(expect_reads_match(m)) << "the refused write wrote nothing";
  // The valid combinations are served.
  const Bytes data = pattern(8192, 4096, 2);
  EXPECT_TRUE(Ok(c.write(8192, data, wire::kCmdFlagFua), c));
  m.write(8192, data);
  EXPECT_TRUE(Ok(c.call(wire::kCmdRead, 8192, 4096, wire::kCmdFlagFua), c)) << "FUA is valid on any command";
  auto whole = c.call(wire::kCmdRead, 0, 3 * 8192, wire::kCmdFlagDf);
  ASSERT_TRUE(Ok(whole, c)) << "DF: one chunk";
  EXPECT_TRUE(SameBytes(whole->data, m.read(0, 3 * 8192)));
  EXPECT_TRUE(Ok(c.call(wire::kCmdWriteZeroes, 65536, 4096, wire::kCmdFlagNoHole), c));
  EXPECT_TRUE(Ok(c.call(wire::kCmdBlockStatus, 0, kSize, wire::kCmdFlagReqOne), c));
  ASSERT_NO_FATAL_FAILURE(expect_reads_match(m));
  ASSERT_NO_FATAL_FAILURE(disconnect());
  EXPECT_TRUE(SameBytes(finish().contents, m.all()));
}

// NBD_CMD_CACHE (advertised): served for any in-range length (with or
// without FUA), refused past the end like a READ, and changes nothing.
TEST_F(SessionTest, CacheIsServedInRangeAndChangesNothing) {
  ASSERT_NO_FATAL_FAILURE(connect());
  Client& c = client();
  Model m;
  const Bytes data = pattern(kCluster, 3 * kCluster, 9);
  ASSERT_TRUE(Ok(c.write(kCluster, data), c));
  m.write(kCluster, data);
  EXPECT_TRUE(Ok(c.call(wire::kCmdCache, 0, kSize), c));
  EXPECT_TRUE(Ok(c.call(wire::kCmdCache, kCluster + 100, 5000, wire::kCmdFlagFua), c));
  EXPECT_TRUE(Failed(c.call(wire::kCmdCache, kSize - 512, 1024), c, wire::kEinval));
  ASSERT_NO_FATAL_FAILURE(expect_reads_match(m));
  ASSERT_NO_FATAL_FAILURE(disconnect());
  EXPECT_TRUE(SameBytes(finish().contents, m.all()));
}

// Zero-length requests (proto.md leaves them to the server): a READ is
// answered with a valid reply carrying no data (an OFFSET_DATA chunk must
// carry at least one byte), BLOCK_STATUS is refused with EINVAL as qemu-nbd
// does (its reply must describe a non-empty range), and the session goes on.
TEST_F(SessionTest, ZeroLengthReadsAndBlockStatusGetValidReplies) {
  ASSERT_NO_FATAL_FAILURE(connect());
  Client& c = client();
  auto read = c.read(4096, 0);
  ASSERT_TRUE(Ok(read, c));
  EXPECT_TRUE(read->data.empty());
  EXPECT_TRUE(Failed(c.call(wire::kCmdBlockStatus, 0, 0), c, wire::kEinval));
  EXPECT_TRUE(Ok(c.call(wire::kCmdFlush, 0, 0), c));
  ASSERT_NO_FATAL_FAILURE(expect_reads_match(Model()));
  ASSERT_NO_FATAL_FAILURE(disconnect());
}

// Queues writes, reads and a flush, then `last` (a request header sent as
// is); every queued request must be answered before the server closes the
// connection, and every write must be on the disk afterwards.
class EndOfSessionTest : public SessionTest {
 protected:
  void run_until(uint32_t magic, uint16_t type) {
    ASSERT_NO_FATAL_FAILURE(connect());
    Client& c = client();
    Model m;
    std::set<uint64_t> sent;
    for (uint32_t i = 0; i < 8; ++i) {
      Bytes data = pattern(i * 3 * kCluster / 2, 20000, 20 + i);
      auto cookie = c.submit_write(i * 3 * kCluster / 2, data, i == 7 ? wire::kCmdFlagFua : 0);
      ASSERT_TRUE(cookie) << c.error();
      sent.insert(*cookie);
      m.write(i * 3 * kCluster / 2, data);
    }
    auto read = c.submit(wire::kCmdRead, kSize - 8192, 8192);  // never written: zeros
    auto flush = c.submit(wire::kCmdFlush, 0, 0);
    ASSERT_TRUE(read && flush) << c.error();
    sent.insert({*read, *flush});
    ASSERT_TRUE(c.send_raw_request(magic, type, 0, 0)) << c.error();

    auto replies = c.wait_all();
    ASSERT_TRUE(replies) << c.error();
    std::set<uint64_t> answered;
    for (auto& [cookie, reply] : *replies) {
      answered.insert(cookie);
      EXPECT_EQ(reply.error, 0u) << reply.message;
    }
    EXPECT_EQ(answered, sent);
    EXPECT_TRUE(SameBytes(replies->at(*read).data, Bytes(8192, 0)));
    EXPECT_TRUE(c.closed_by_server()) << c.error();

    ServerOutcome out = finish();
    EXPECT_TRUE(out.transmission_returned);
    EXPECT_TRUE(SameBytes(out.contents, m.all()));
  }
};

TEST_F(EndOfSessionTest, DiscAnswersEveryRequestInFlightThenCloses) {
  run_until(wire::kRequestMagic, wire::kCmdDisc);
}

TEST_F(EndOfSessionTest, BadMagicClosesAfterAnsweringEveryEarlierRequest) {
  run_until(0xdeadbeef, wire::kCmdRead);
}

}  // namespace
}  // namespace uqcow::nbd
