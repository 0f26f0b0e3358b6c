// Fault rules in blkdebug's spirit (QEMU's [inject-error] sections):
//
//   event=NAME,errno=N[,once=on][,after=K][,immediately=on]
//
// When debug event NAME has fired more than K times, the rule is armed: the
// next I/O request on the device fails with -N. once=on disarms the rule
// after that one failure; otherwise every later request fails too (a dead
// disk). immediately=on fails the request at once, without suspending;
// otherwise the failure is delivered after one trip through the reactor,
// like a real completion (blkdebug's `immediately`).
//
// A FaultInjector owns the rules and their counters. It is shared between
// whoever configured it (options, tests reading the counters) and the
// FaultInjectingDevice that consults it.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "block/debug_event.h"
#include "engine/result.h"

namespace uqcow {

struct FaultRule {
  BlkDebugEvent event = BlkDebugEvent::kWriteAio;
  int error = EIO;           // positive errno
  bool once = false;
  uint64_t after = 0;        // events that pass before the rule arms
  bool immediately = false;
  std::string text;          // the rule as written, for messages
};

// Parses one rule. Errors (EINVAL) name the bad key or value.
Result<FaultRule> parse_fault_rule(std::string_view text);

class FaultInjector {
 public:
  struct RuleState {
    uint64_t events = 0;    // times the rule's event fired (until spent)
    uint64_t injected = 0;  // requests failed by this rule
    bool armed = false;
    bool spent = false;     // a once rule that has fired
  };

  void add_rule(FaultRule rule);
  // Parses `text` (parse_fault_rule) and adds the rule; EINVAL as the parser.
  Status add_rule(std::string_view text);
  const std::vector<FaultRule>& rules() const { return rules_; }
  const RuleState& state(size_t rule) const { return states_[rule]; }
  bool empty() const { return rules_.empty(); }

  // A debug event fired: arms the rules waiting for it.
  void on_event(BlkDebugEvent event);
  // An I/O request is starting: returns the armed rule that fails it (and
  // counts the failure, disarming a once rule), or nullptr.
  const FaultRule* take_fault();
  // One line per rule: "event=...: N events, M requests failed".
  std::string report() const;

 private:
  std::vector<FaultRule> rules_;
  std::vector<RuleState> states_;
  bool any_armed_ = false;
};

}  // namespace uqcow
