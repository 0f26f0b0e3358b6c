#include "engine/ready_queue.h"

namespace uqcow {

ReadyQueue& this_thread_ready_queue() {
  thread_local ReadyQueue queue;
  return queue;
}

}  // namespace uqcow
