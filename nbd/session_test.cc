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

// A dirty bitmap the fake disk keeps, dirty over `dirty` (offset, length)
// ranges when the session starts.
struct FakeBitmap {
  std::string name;
  std::vector<std::pair<uint64_t, uint64_t>> dirty;
  bool inconsistent = false;  // dirty_bitmap() refuses it with EINVAL
};

struct ServerConfig {
  std::string path;
  bool qcow2 = true;  // else a raw file
  bool read_only = false;
  // A qcow2 image over a backing file of kBackingSize bytes whose clusters
  // kBackingData hold data (the top image holds none).
  bool backing = false;
  bool allocation_depth = false;          // serve -A
  std::vector<FakeBitmap> bitmaps;         // the disk's (a FakeBitmapDisk around the image)
  std::vector<std::string> export_bitmaps; // serve -B, in export order
};

constexpr uint64_t kBackingSize = kSize / 2;
constexpr uint64_t kBackingData[] = {1, 3};

// What the server side did, for the test to check after the session.
struct ServerOutcome {
  Status setup;       // creating and opening the image
  Status exported;    // find_export_bitmap()'s error, when it failed
  Status negotiation; // negotiate()'s error, when it failed
  std::optional<Negotiated> negotiated;
  bool transmission_returned = false;
  Bytes contents;     // the export after the session, read through its Disk
  Status closed;
};

// The backing file of ServerConfig::backing, written through its own Disk.
Task<Status> create_backing_file(const std::string& path) {
  const qcow2::CreateOptions options{.size = kBackingSize};
  UQ_CO_TRY(co_await qcow2::create_image(path, options));
  const OpenOptions open{.read_only = false, .format = "qcow2"};
  UQ_CO_ASSIGN_OR_RETURN(auto disk, co_await open_disk(path, open));
  std::vector<std::byte> data(kCluster, std::byte{0x5a});
  for (uint64_t cluster : kBackingData) UQ_CO_TRY(co_await disk->write(cluster * kCluster, data));
  co_return co_await disk->close();
}

Task<Status> create_image_file(const ServerConfig& config) {
  if (config.qcow2) {
    // A named variable, not a temporary inside the co_await expression:
    // GCC 12 destroys such a temporary wrongly (free(): invalid pointer).
    qcow2::CreateOptions options{.size = kSize};
    if (config.backing) {
      UQ_CO_TRY(co_await create_backing_file(config.path + ".base"));
      options.backing_file = config.path + ".base";
      options.backing_format = "qcow2";
    }
    co_return co_await qcow2::create_image(config.path, options);
  }
  FileDesc fd(::open(config.path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd.valid() || ::ftruncate(fd.get(), kSize) != 0) co_return errno_error(errno, "create " + config.path);
  co_return ok_status();
}

// A Disk that forwards everything to a real one and keeps dirty bitmaps the
// test fills, standing in for a format's persistent bitmaps: dirty_bitmap()
// finds them by name (EINVAL for an inconsistent one, ENOENT for others),
// and every write, zero write and discard marks each consistent one, as an
// enabled persistent bitmap is marked.
class FakeBitmapDisk : public Disk {
 public:
  FakeBitmapDisk(std::unique_ptr<Disk> inner, const std::vector<FakeBitmap>& bitmaps) : inner_(std::move(inner)) {
    for (const FakeBitmap& b : bitmaps) {
      auto bitmap = DirtyBitmap::create(inner_->size(), kCluster);
      for (auto [offset, len] : b.dirty) bitmap->set(offset, len);
      bitmaps_.emplace(b.name, Entry{std::move(*bitmap), b.inconsistent});
    }
  }
  uint64_t size() const override { return inner_->size(); }
  bool read_only() const override { return inner_->read_only(); }
  std::string format_name() const override { return inner_->format_name(); }
  const std::string& filename() const override { return inner_->filename(); }
  Disk* backing() const override { return inner_->backing(); }
  Task<Status> read(uint64_t offset, std::span<std::byte> buf) override { return inner_->read(offset, buf); }
  Task<Status> write(uint64_t offset, std::span<const std::byte> buf) override {
    UQ_CO_TRY(co_await inner_->write(offset, buf));
    mark(offset, buf.size());
    co_return ok_status();
  }
  Task<Status> write_zeroes(uint64_t offset, uint64_t len, bool may_unmap) override {
    UQ_CO_TRY(co_await inner_->write_zeroes(offset, len, may_unmap));
    mark(offset, len);
    co_return ok_status();
  }
  Task<Status> discard(uint64_t offset, uint64_t len) override {
    UQ_CO_TRY(co_await inner_->discard(offset, len));
    mark(offset, len);
    co_return ok_status();
  }
  Task<Status> flush() override { return inner_->flush(); }
  Task<Result<BlockStatus>> block_status(uint64_t offset, uint64_t max_len) override {
    return inner_->block_status(offset, max_len);
  }
  Task<Status> close() override { return inner_->close(); }
  Result<uint64_t> allocated_bytes() const override { return inner_->allocated_bytes(); }
  Result<const DirtyBitmap*> dirty_bitmap(const std::string& name) const override {
    auto it = bitmaps_.find(name);
    if (it == bitmaps_.end()) return Error(ENOENT, "fake: no bitmap " + name);
    if (it->second.inconsistent) return Error(EINVAL, "fake: bitmap " + name + " is in use");
    return &it->second.bitmap;
  }

 private:
  struct Entry {
    DirtyBitmap bitmap;
    bool inconsistent;
  };
  void mark(uint64_t offset, uint64_t len) {
    for (auto& [name, e] : bitmaps_) {
      if (!e.inconsistent) e.bitmap.set(offset, len);
    }
  }
  std::unique_ptr<Disk> inner_;
  std::map<std::string, Entry> bitmaps_;
};

// The export as `uqcow serve` builds it: -A, and each -B bitmap looked up.
Status build_export(const ServerConfig& config, Export& exp) {
  exp.contexts.allocation_depth = config.allocation_depth;
  for (const std::string& name : config.export_bitmaps) {
    UQ_ASSIGN_OR_RETURN(ExportedBitmap b, find_export_bitmap(*exp.disk, name));
    exp.contexts.bitmaps.push_back(std::move(b));
  }
  return ok_status();
}

Task<void> serve_one(int fd, ServerConfig config, ServerOutcome* out) {
  out->setup = co_await create_image_file(config);
  if (!out->setup.ok()) co_return;
  const OpenOptions options{.read_only = config.read_only, .format = config.qcow2 ? "qcow2" : "raw"};
  auto opened = co_await open_disk(config.path, options);
  if (!opened.ok()) {
    out->setup = std::move(opened).error();
    co_return;
  }
  std::unique_ptr<Disk> disk = std::move(*opened);
  if (!config.bitmaps.empty()) disk = std::make_unique<FakeBitmapDisk>(std::move(disk), config.bitmaps);
  Export exp{kExportName, disk.get(), config.read_only};
  out->exported = build_export(config, exp);
  if (out->exported.ok()) {
    auto negotiated = co_await negotiate(fd, exp);
    if (negotiated.ok()) {
      out->negotiated = *negotiated;
      co_await serve_transmission(fd, exp, *negotiated);
      out->transmission_returned = true;
    } else {
      out->negotiation = std::move(negotiated).error();
    }
  }
  out->contents.resize(kSize);
  Status read = co_await disk->read(0, std::as_writable_bytes(std::span(out->contents)));
  if (!read.ok()) out->contents.clear();
  out->closed = co_await disk->close();
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
    ::unlink((dir_ + "/image.base").c_str());
    ::rmdir(dir_.c_str());
  }

  // Starts the server on a fresh image; client() is the other end.
  void start(bool qcow2 = true, bool read_only = false) {
    ServerConfig config;
    config.qcow2 = qcow2;
    config.read_only = read_only;
    start(std::move(config));
  }
  // The same with any configuration; its path is set here.
  void start(ServerConfig config) {
    int fds[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0) << std::strerror(errno);
    client_fd_.reset(fds[1]);
    client_ = std::make_unique<Client>(fds[1]);
    config.path = dir_ + "/image";
    server_ = std::make_unique<ServerThread>(FileDesc(fds[0]), std::move(config));
  }
  // start(config), the greeting and FIXED_NEWSTYLE | NO_ZEROES: the client
  // is haggling.
  void start_haggling(ServerConfig config) {
    ASSERT_NO_FATAL_FAILURE(start(std::move(config)));
    ASSERT_TRUE(client().greeting()) << client().error();
    ASSERT_TRUE(client().send_client_flags(wire::kClientFixedNewstyle | wire::kClientNoZeroes));
  }
  // GO for the export, which must be accepted.
  void go() {
    ExportInfo info;
    auto refused = client().go(kExportName, &info);
    ASSERT_TRUE(refused) << client().error();
    ASSERT_EQ(*refused, 0u);
    info_ = info;
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
  EXPECT_TRUE(out.negotiated->contexts.base_allocation);
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
  EXPECT_FALSE(out.negotiated->contexts.base_allocation);
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

// ---- metadata contexts -------------------------------------------------------

using testing::Extents;
using testing::MetaContextReply;

// The context names of a LIST/SET answer, in reply order.
std::vector<std::string> names(const MetaContextReply& r) {
  std::vector<std::string> out;
  for (const auto& [id, name] : r.contexts) out.push_back(name);
  return out;
}
using Names = std::vector<std::string>;

// Runs of kCluster bytes, one value per cluster, merged where equal: what a
// context's BLOCK_STATUS extents must be.
Extents cluster_runs(const std::vector<uint32_t>& per_cluster) {
  Extents runs;
  for (uint32_t v : per_cluster) {
    if (!runs.empty() && runs.back().second == v) {
      runs.back().first += kCluster;
    } else {
      runs.emplace_back(kCluster, v);
    }
  }
  return runs;
}

// The extents of `context` over [offset, end), adjacent equal ones merged,
// from BLOCK_STATUS requests that each start where that context's chunk of
// the last reply ended.
std::optional<Extents> context_runs(Client& c, uint32_t context, uint64_t offset = 0, uint64_t end = kSize) {
  Extents runs;
  while (offset < end) {
    auto r = c.call(wire::kCmdBlockStatus, offset, static_cast<uint32_t>(end - offset));
    EXPECT_TRUE(Ok(r, c)) << "BLOCK_STATUS at " << offset;
    if (!r || r->error != 0) return std::nullopt;
    auto chunk = std::find_if(r->chunks.begin(), r->chunks.end(),
                              [&](const testing::StatusChunk& ch) { return ch.context == context; });
    if (chunk == r->chunks.end()) {
      ADD_FAILURE() << "no chunk for context " << context << " at " << offset;
      return std::nullopt;
    }
    for (auto [len, flags] : chunk->extents) {
      if (!runs.empty() && runs.back().second == flags) {
        runs.back().first += len;
      } else {
        runs.emplace_back(len, flags);
      }
      offset += len;
    }
  }
  return runs;
}

// The id the last SET gave `name`.
uint32_t id_of(const Client& c, const std::string& name) {
  auto it = c.selected_contexts().find(name);
  EXPECT_NE(it, c.selected_contexts().end()) << name << " is not selected";
  return it == c.selected_contexts().end() ? UINT32_MAX : it->second;
}

ServerConfig all_contexts_config() {
  ServerConfig config;
  config.allocation_depth = true;
  config.bitmaps = {{"b0", {{2 * kCluster, 2 * kCluster}, {10 * kCluster + 100, 1}}}, {"b1", {{0, 1}}}};
  config.export_bitmaps = {"b1", "b0"};
  return config;
}

// LIST_META_CONTEXT as qemu-nbd 7.2 answers it: no query lists everything,
// an empty leaf ("base:", "qemu:", "qemu:dirty-bitmap:") lists what lies
// under it, unknown namespaces and names list nothing, the replies come in
// the server's order with id 0, and nothing is selected.
TEST_F(SessionTest, ListMetaContextMatchesQueriesAsQemuNbd) {
  ASSERT_NO_FATAL_FAILURE(start_haggling(all_contexts_config()));
  Client& c = client();
  // LIST needs no structured replies (SET does).
  auto list = [&](const std::vector<std::string>& queries) -> Names {
    auto r = c.meta_contexts(wire::kOptListMetaContext, kExportName, queries);
    EXPECT_TRUE(r) << c.error();
    if (!r) return {"<no reply>"};
    EXPECT_EQ(r->error, 0u) << r->message;
    for (const auto& [id, name] : r->contexts) EXPECT_EQ(id, 0u) << name << ": LIST answers id 0";
    return names(*r);
  };
  const std::string b0 = "qemu:dirty-bitmap:b0", b1 = "qemu:dirty-bitmap:b1";
  EXPECT_EQ(list({}), (Names{"base:allocation", "qemu:allocation-depth", b1, b0}));
  EXPECT_EQ(list({"base:"}), (Names{"base:allocation"}));
  EXPECT_EQ(list({"qemu:"}), (Names{"qemu:allocation-depth", b1, b0}));
  EXPECT_EQ(list({"qemu:dirty-bitmap:"}), (Names{b1, b0}));
  EXPECT_EQ(list({b0, "other:allocation", "base:allocation", "qemu:nothing", "base:nothing", "qemu:dirty-bitmap:b2",
                  "qemu:allocation-depth", "base:allocation", "qemu", ""}),
            (Names{"base:allocation", "qemu:allocation-depth", b0}));
  EXPECT_EQ(list({"nothing:", "qemu:dirty-bitmap:B0"}), Names{});

  auto unknown = c.meta_contexts(wire::kOptListMetaContext, "no-such-export", {});
  ASSERT_TRUE(unknown) << c.error();
  EXPECT_EQ(unknown->error, wire::kRepErrUnknown);
  auto early = c.meta_contexts(wire::kOptSetMetaContext, kExportName, {"base:allocation"});
  ASSERT_TRUE(early) << c.error();
  EXPECT_EQ(early->error, wire::kRepErrInvalid) << "SET before STRUCTURED_REPLY";

  ASSERT_TRUE(c.negotiate_structured_replies()) << c.error();
  ASSERT_NO_FATAL_FAILURE(go());
  EXPECT_TRUE(Failed(c.call(wire::kCmdBlockStatus, 0, 4096), c, wire::kEinval)) << "LIST selects nothing";
  ASSERT_NO_FATAL_FAILURE(disconnect());
  ServerOutcome out = finish();
  ASSERT_TRUE(out.negotiated);
  EXPECT_EQ(out.negotiated->contexts.count(), 0u);
}

// Without -A or -B only base:allocation exists.
TEST_F(SessionTest, ContextsNotOfferedAreNeitherListedNorSelected) {
  ASSERT_NO_FATAL_FAILURE(start_haggling(ServerConfig{}));
  Client& c = client();
  auto all = c.meta_contexts(wire::kOptListMetaContext, kExportName, {});
  ASSERT_TRUE(all) << c.error();
  EXPECT_EQ(names(*all), Names{"base:allocation"});
  auto qemu = c.meta_contexts(wire::kOptListMetaContext, kExportName, {"qemu:", "qemu:allocation-depth"});
  ASSERT_TRUE(qemu) << c.error();
  EXPECT_EQ(names(*qemu), Names{});
  ASSERT_TRUE(c.negotiate_structured_replies()) << c.error();
  auto set = c.meta_contexts(wire::kOptSetMetaContext, kExportName, {"qemu:allocation-depth"});
  ASSERT_TRUE(set) << c.error();
  EXPECT_EQ(set->error, 0u);
  EXPECT_EQ(names(*set), Names{});
  ASSERT_NO_FATAL_FAILURE(go());
  EXPECT_TRUE(Failed(c.call(wire::kCmdBlockStatus, 0, 4096), c, wire::kEinval));
  ASSERT_NO_FATAL_FAILURE(disconnect());
}

// SET selects several contexts at once, each with its own id, and replaces
// the previous selection; an empty leaf selects nothing on SET. BLOCK_STATUS
// then answers one chunk per selected context in the server's order, the
// last one DONE (the client checks the ids, one chunk per context, and one
// descriptor each with REQ_ONE).
TEST_F(SessionTest, SetMetaContextSelectsSeveralContextsOneChunkEach) {
  ASSERT_NO_FATAL_FAILURE(start_haggling(all_contexts_config()));
  Client& c = client();
  ASSERT_TRUE(c.negotiate_structured_replies()) << c.error();
  auto first = c.meta_contexts(wire::kOptSetMetaContext, kExportName, {"qemu:dirty-bitmap:b1", "base:allocation"});
  ASSERT_TRUE(first) << c.error();
  EXPECT_EQ(names(*first), (Names{"base:allocation", "qemu:dirty-bitmap:b1"}));
  auto second = c.meta_contexts(wire::kOptSetMetaContext, kExportName,
                                {"qemu:", "qemu:dirty-bitmap:", "base:", "qemu:dirty-bitmap:b0", "x-vendor:thing",
                                 "qemu:allocation-depth", "base:allocation"});
  ASSERT_TRUE(second) << c.error();
  ASSERT_EQ(names(*second), (Names{"base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"}));
  std::vector<uint32_t> ids;
  for (const auto& [id, name] : second->contexts) ids.push_back(id);
  ASSERT_NO_FATAL_FAILURE(go());

  auto all = c.call(wire::kCmdBlockStatus, 0, kSize);
  ASSERT_TRUE(Ok(all, c));
  std::vector<uint32_t> order;
  for (const auto& chunk : all->chunks) order.push_back(chunk.context);
  EXPECT_EQ(order, ids);
  EXPECT_EQ(all->chunks.at(0).extents, (Extents{{kSize, wire::kStateHole | wire::kStateZero}}));
  EXPECT_EQ(all->chunks.at(1).extents, (Extents{{kSize, 0}})) << "a fresh image without a backing file";
  EXPECT_EQ(all->chunks.at(2).extents, (Extents{{2 * kCluster, 0}, {2 * kCluster, wire::kStateDirty},
                                                {6 * kCluster, 0}, {kCluster, wire::kStateDirty},
                                                {5 * kCluster, 0}}));
  auto one = c.call(wire::kCmdBlockStatus, kCluster / 2, 3 * kCluster, wire::kCmdFlagReqOne);
  ASSERT_TRUE(Ok(one, c));
  ASSERT_EQ(one->chunks.size(), 3u);
  EXPECT_EQ(one->chunks[0].extents, (Extents{{3 * kCluster, wire::kStateHole | wire::kStateZero}}));
  EXPECT_EQ(one->chunks[1].extents, (Extents{{3 * kCluster, 0}}));
  EXPECT_EQ(one->chunks[2].extents, (Extents{{3 * kCluster / 2, 0}})) << "REQ_ONE: the first run only";
  ASSERT_NO_FATAL_FAILURE(disconnect());
  ServerOutcome out = finish();
  ASSERT_TRUE(out.negotiated);
  EXPECT_EQ(out.negotiated->contexts.count(), 3u);
  EXPECT_TRUE(out.negotiated->contexts.bitmap(1)) << "b0 is exported second";
  EXPECT_FALSE(out.negotiated->contexts.bitmap(0)) << "b1 was replaced";
}

// A SET that fails leaves no context selected (qemu-nbd drops the old
// selection first), and so does one that matches nothing.
TEST_F(SessionTest, AFailedOrEmptySetLeavesNoContextSelected) {
  for (bool malformed : {true, false}) {
    SCOPED_TRACE(malformed ? "malformed SET" : "SET matching nothing");
    ASSERT_NO_FATAL_FAILURE(start_haggling(all_contexts_config()));
    Client& c = client();
    ASSERT_TRUE(c.negotiate_structured_replies()) << c.error();
    ASSERT_TRUE(c.select_base_allocation(kExportName)) << c.error();
    if (malformed) {
      ASSERT_TRUE(c.send_option(wire::kOptSetMetaContext, Bytes{0, 0, 0, 4, 'd', 'i'}));
    } else {
      Bytes d{0, 0, 0, 4, 'd', 'i', 's', 'k', 0, 0, 0, 1, 0, 0, 0, 6, 'n', 'o', 'p', 'e', ':', 'x'};
      ASSERT_TRUE(c.send_option(wire::kOptSetMetaContext, d));
    }
    auto r = c.meta_context_replies(wire::kOptSetMetaContext);
    ASSERT_TRUE(r) << c.error();
    EXPECT_EQ(r->error, malformed ? wire::kRepErrInvalid : 0u) << r->message;
    EXPECT_TRUE(r->contexts.empty());
    ASSERT_NO_FATAL_FAILURE(go());
    EXPECT_TRUE(Failed(c.call(wire::kCmdBlockStatus, 0, 4096), c, wire::kEinval));
    ASSERT_NO_FATAL_FAILURE(disconnect());
    ServerOutcome out = finish();
    ASSERT_TRUE(out.negotiated);
    EXPECT_EQ(out.negotiated->contexts.count(), 0u);
  }
}

// Lengths and counts in the option are the client's: each is checked
// against the option's data, refused with NBD_REP_ERR_INVALID naming the
// field, and the handshake goes on. A query over 4096 bytes is skipped
// (qemu-nbd's NBD_MAX_STRING_SIZE), not refused.
TEST_F(SessionTest, MalformedMetaContextQueriesAreRefusedNamingTheField) {
  ASSERT_NO_FATAL_FAILURE(start_haggling(ServerConfig{}));
  Client& c = client();
  ASSERT_TRUE(c.negotiate_structured_replies()) << c.error();
  auto be32 = [](uint32_t v) { return Bytes{uint8_t(v >> 24), uint8_t(v >> 16), uint8_t(v >> 8), uint8_t(v)}; };
  auto cat = [](std::initializer_list<Bytes> parts) {
    Bytes out;
    for (const Bytes& p : parts) out.insert(out.end(), p.begin(), p.end());
    return out;
  };
  const Bytes disk = cat({be32(4), Bytes{'d', 'i', 's', 'k'}});
  const Bytes base = {'b', 'a', 's', 'e', ':', 'a', 'l', 'l', 'o', 'c', 'a', 't', 'i', 'o', 'n'};
  Bytes with_nul = base;
  with_nul[5] = 0;
  const std::pair<Bytes, std::string> cases[] = {
      {Bytes{0, 0}, "export name length missing"},
      {cat({be32(4097), Bytes(4097, 'x'), be32(0)}), "export name length 4097 exceeds 4096"},
      {cat({be32(100), Bytes{'d', 'i', 's', 'k'}}), "export name length exceeds"},
      {cat({be32(4), Bytes{'d', 0, 's', 'k'}, be32(0)}), "export name: embedded NUL"},
      {disk, "number of queries missing"},
      {cat({disk, be32(0x40000000), be32(1), Bytes{'x'}}), "number of queries 1073741824 exceeds"},
      {cat({disk, be32(5), be32(15), base}), "number of queries 5 exceeds"},
      {cat({disk, be32(2), be32(15), base}), "query 1: length exceeds"},
      {cat({disk, be32(1), be32(100), base}), "query 0: length exceeds"},
      {cat({disk, be32(2), be32(15), base, be32(15), with_nul}), "query 1: embedded NUL"},
      {cat({disk, be32(1), be32(15), base, Bytes{0}}), "data after the last query"},
  };
  for (uint32_t option : {wire::kOptListMetaContext, wire::kOptSetMetaContext}) {
    for (const auto& [data, message] : cases) {
      ASSERT_TRUE(c.send_option(option, data)) << c.error();
      auto r = c.meta_context_replies(option);
      ASSERT_TRUE(r) << c.error();
      EXPECT_EQ(r->error, wire::kRepErrInvalid) << "option " << option << ", want " << message;
      EXPECT_NE(r->message.find(message), std::string::npos) << r->message << "; want " << message;
    }
  }
  auto long_query = c.meta_contexts(wire::kOptListMetaContext, kExportName,
                                    {std::string(5000, 'x'), "base:allocation", "base:" + std::string(4092, 'a')});
  ASSERT_TRUE(long_query) << c.error();
  EXPECT_EQ(names(*long_query), Names{"base:allocation"});
  ASSERT_TRUE(c.select_base_allocation(kExportName)) << c.error();
  ASSERT_NO_FATAL_FAILURE(go());
  EXPECT_TRUE(Ok(c.call(wire::kCmdBlockStatus, 0, kSize), c));
  ASSERT_NO_FATAL_FAILURE(disconnect());
}

// qemu:allocation-depth over a backing file of half the export's size that
// holds clusters kBackingData: 0 where no layer allocates, 1 where the top
// image does (data or zeros), 2 where the backing file does, and 2 past the
// backing file's end (qemu synthesises its zeros there).
TEST_F(SessionTest, AllocationDepthThroughABackingChain) {
  ServerConfig config;
  config.backing = true;
  config.allocation_depth = true;
  ASSERT_NO_FATAL_FAILURE(start_haggling(config));
  Client& c = client();
  ASSERT_TRUE(c.negotiate_structured_replies()) << c.error();
  auto set = c.meta_contexts(wire::kOptSetMetaContext, kExportName, {"qemu:allocation-depth", "base:allocation"});
  ASSERT_TRUE(set) << c.error();
  ASSERT_EQ(names(*set), (Names{"base:allocation", "qemu:allocation-depth"}));
  ASSERT_NO_FATAL_FAILURE(go());
  ASSERT_TRUE(Ok(c.write(3 * kCluster, pattern(3 * kCluster, kCluster, 1)), c));
  ASSERT_TRUE(Ok(c.write(5 * kCluster + 100, pattern(5 * kCluster + 100, 1000, 2)), c));
  ASSERT_TRUE(Ok(c.call(wire::kCmdWriteZeroes, 9 * kCluster, kCluster), c));

  // Per cluster: the layer the writes above and kBackingData put it in.
  std::vector<uint32_t> want(kSize / kCluster, 0);
  for (uint64_t cluster = kBackingSize / kCluster; cluster < want.size(); ++cluster) want[cluster] = 2;
  for (uint64_t cluster : kBackingData) want[cluster] = 2;
  for (uint64_t cluster : {3, 5, 9}) want[cluster] = 1;
  const uint32_t depth = id_of(c, "qemu:allocation-depth");
  auto runs = context_runs(c, depth);
  ASSERT_TRUE(runs);
  EXPECT_EQ(*runs, cluster_runs(want));

  auto inside = context_runs(c, depth, kCluster + 5, 3 * kCluster + 5);
  ASSERT_TRUE(inside);
  EXPECT_EQ(*inside, (Extents{{kCluster - 5, 2}, {kCluster, 0}, {5, 1}}));
  auto one = c.call(wire::kCmdBlockStatus, 3 * kCluster + 10, 4 * kCluster, wire::kCmdFlagReqOne);
  ASSERT_TRUE(Ok(one, c));
  ASSERT_EQ(one->chunks.size(), 2u);
  EXPECT_EQ(one->chunks[1].extents, (Extents{{kCluster - 10, 1}}));
  ASSERT_NO_FATAL_FAILURE(disconnect());
}

// qemu:dirty-bitmap:NAME over a fake disk's bitmaps: NBD_STATE_DIRTY where
// the bitmap is dirty, granule by granule, and read live: a write through
// the session marks the bitmap and the next BLOCK_STATUS shows it.
TEST_F(SessionTest, DirtyBitmapContextReadsTheBitmapLive) {
  ASSERT_NO_FATAL_FAILURE(start_haggling(all_contexts_config()));
  Client& c = client();
  ASSERT_TRUE(c.negotiate_structured_replies()) << c.error();
  auto set = c.meta_contexts(wire::kOptSetMetaContext, kExportName, {"qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"});
  ASSERT_TRUE(set) << c.error();
  ASSERT_EQ(names(*set), (Names{"qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:b0"}));
  ASSERT_NO_FATAL_FAILURE(go());
  const uint32_t b0 = id_of(c, "qemu:dirty-bitmap:b0"), b1 = id_of(c, "qemu:dirty-bitmap:b1");
  EXPECT_NE(b0, b1);

  std::vector<uint32_t> want_b0(kSize / kCluster, 0), want_b1(kSize / kCluster, 0);
  want_b0[2] = want_b0[3] = want_b0[10] = wire::kStateDirty;
  want_b1[0] = wire::kStateDirty;
  auto runs = context_runs(c, b0);
  ASSERT_TRUE(runs);
  EXPECT_EQ(*runs, cluster_runs(want_b0));
  runs = context_runs(c, b1);
  ASSERT_TRUE(runs);
  EXPECT_EQ(*runs, cluster_runs(want_b1));
  auto inside = context_runs(c, b0, 2 * kCluster + 7, 2 * kCluster + 107);
  ASSERT_TRUE(inside);
  EXPECT_EQ(*inside, (Extents{{100, wire::kStateDirty}}));
  auto one = c.call(wire::kCmdBlockStatus, kCluster + 1, 4 * kCluster, wire::kCmdFlagReqOne);
  ASSERT_TRUE(Ok(one, c));
  ASSERT_EQ(one->chunks.size(), 2u);
  EXPECT_EQ(one->chunks[0].extents, (Extents{{4 * kCluster, 0}})) << "b1";
  EXPECT_EQ(one->chunks[1].extents, (Extents{{kCluster - 1, 0}})) << "b0";

  ASSERT_TRUE(Ok(c.write(6 * kCluster + 5, pattern(6 * kCluster + 5, 10, 3)), c));
  ASSERT_TRUE(Ok(c.call(wire::kCmdWriteZeroes, 15 * kCluster, kCluster), c));
  want_b0[6] = want_b0[15] = want_b1[6] = want_b1[15] = wire::kStateDirty;
  runs = context_runs(c, b0);
  ASSERT_TRUE(runs);
  EXPECT_EQ(*runs, cluster_runs(want_b0));
  runs = context_runs(c, b1);
  ASSERT_TRUE(runs);
  EXPECT_EQ(*runs, cluster_runs(want_b1));
  ASSERT_NO_FATAL_FAILURE(disconnect());
}

// `serve -B NAME` looks the bitmap up before serving; a missing or an
// inconsistent one stops it with qemu-nbd's message, and no client is
// served.
TEST_F(SessionTest, ExportingAMissingOrInconsistentBitmapFailsWithQemuNbdsMessage) {
  const std::pair<std::string, std::pair<int, std::string>> cases[] = {
      {"missing", {ENOENT, "Bitmap 'missing' is not found"}},
      {"bad", {EINVAL, "Bitmap 'bad' is inconsistent and cannot be used"}},
  };
  for (const auto& [name, want] : cases) {
    ServerConfig config;
    config.bitmaps = {{"good", {}}, {"bad", {}, /*inconsistent=*/true}};
    config.export_bitmaps = {"good", name};
    ASSERT_NO_FATAL_FAILURE(start(std::move(config)));
    EXPECT_FALSE(client().greeting()) << "no handshake without the export";
    ServerOutcome out = finish();
    EXPECT_EQ(out.exported.code(), want.first) << out.exported.message();
    EXPECT_EQ(out.exported.message(), want.second);
    EXPECT_FALSE(out.negotiated);
  }
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
