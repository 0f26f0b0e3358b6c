// The NBD server: a listening socket (unix or TCP), an accept loop, one
// session coroutine per client, all on the current thread's reactor.
//
// Shutdown: SIGTERM or SIGINT (read from a signalfd on the ring) stops the
// accept loop and ends each session's reader; requests already in flight
// are answered, then run() returns and the caller closes the Disk.
#pragma once

#include <cstdint>
#include <set>
#include <string>

#include "engine/result.h"
#include "engine/task.h"
#include "engine/task_group.h"
#include "nbd/session.h"
#include "uring/file_desc.h"

namespace uqcow::nbd {

struct ListenAddress {
  std::string unix_path;  // set: a unix socket at this path
  std::string host;       // else TCP on host:port
  uint16_t port = 10809;
};

class Server {
 public:
  explicit Server(Export exp) : export_(std::move(exp)) {}
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds and listens. Blocks the signals it will wait for (SIGTERM, SIGINT)
  // so that they reach the signalfd, not the default handler.
  Status listen(const ListenAddress& address);
  // Serves until SIGTERM/SIGINT; returns when every session has ended.
  Task<Status> run();

 private:
  Task<void> accept_loop();
  Task<void> wait_for_signal();
  // Owns the client socket: closes it when the session ends.
  Task<void> session(FileDesc socket);
  void stop();

  Export export_;
  std::string unix_path_;
  FileDesc listen_fd_;
  FileDesc signal_fd_;
  bool stopping_ = false;
  std::set<int> client_fds_;
  TaskGroup sessions_;
};

}  // namespace uqcow::nbd
