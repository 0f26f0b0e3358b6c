#include "fault/fault_rule.h"

#include <charconv>
#include <cstring>

namespace uqcow {
namespace {

Result<bool> parse_bool(std::string_view key, std::string_view v) {
  if (v == "on" || v == "true" || v == "yes") return true;
  if (v == "off" || v == "false" || v == "no") return false;
  return Error(EINVAL, "inject: " + std::string(key) + "='" + std::string(v) + "' must be on or off");
}

Result<uint64_t> parse_uint(std::string_view key, std::string_view v) {
  uint64_t n = 0;
  auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
  if (v.empty() || ec != std::errc() || end != v.data() + v.size()) {
    return Error(EINVAL, "inject: " + std::string(key) + "='" + std::string(v) + "' is not a number");
  }
  return n;
}

}  // namespace

Result<FaultRule> parse_fault_rule(std::string_view text) {
  FaultRule rule;
  rule.text = std::string(text);
  bool have_event = false;
  while (!text.empty()) {
    size_t comma = text.find(',');
    std::string_view item = text.substr(0, comma);
    text = comma == std::string_view::npos ? std::string_view() : text.substr(comma + 1);
    size_t eq = item.find('=');
    if (eq == std::string_view::npos) {
      return Error(EINVAL, "inject: '" + std::string(item) + "' is not KEY=VALUE");
    }
    std::string_view key = item.substr(0, eq), value = item.substr(eq + 1);
    if (key == "event") {
      auto e = parse_blkdebug_event(value);
      if (!e) return Error(EINVAL, "inject: event='" + std::string(value) + "' is not a known event");
      rule.event = *e;
      have_event = true;
    } else if (key == "errno") {
      UQ_ASSIGN_OR_RETURN(uint64_t n, parse_uint(key, value));
      if (n == 0 || n > 4095) {
        return Error(EINVAL, "inject: errno=" + std::string(value) + " is out of range (1..4095)");
      }
      rule.error = static_cast<int>(n);
    } else if (key == "after") {
      UQ_ASSIGN_OR_RETURN(rule.after, parse_uint(key, value));
    } else if (key == "once" || key == "immediately") {
      UQ_ASSIGN_OR_RETURN(bool b, parse_bool(key, value));
      (key == "once" ? rule.once : rule.immediately) = b;
    } else {
      return Error(EINVAL, "inject: unknown key '" + std::string(key) +
                               "' (event, errno, once, after, immediately)");
    }
  }
  if (!have_event) return Error(EINVAL, "inject: rule '" + rule.text + "' has no event=");
  return rule;
}

void FaultInjector::add_rule(FaultRule rule) {
  rules_.push_back(std::move(rule));
  states_.emplace_back();
}

Status FaultInjector::add_rule(std::string_view text) {
  UQ_ASSIGN_OR_RETURN(FaultRule rule, parse_fault_rule(text));
  add_rule(std::move(rule));
  return Status();
}

void FaultInjector::on_event(BlkDebugEvent event) {
  for (size_t i = 0; i < rules_.size(); ++i) {
    RuleState& s = states_[i];
    if (rules_[i].event != event || s.spent) continue;
    if (++s.events > rules_[i].after) {
      s.armed = true;
      any_armed_ = true;
    }
  }
}

const FaultRule* FaultInjector::take_fault() {
  if (!any_armed_) return nullptr;
  for (size_t i = 0; i < rules_.size(); ++i) {
    RuleState& s = states_[i];
    if (!s.armed) continue;
    ++s.injected;
    if (rules_[i].once) {
      s.armed = false;
      s.spent = true;
      any_armed_ = false;
      for (const RuleState& o : states_) any_armed_ = any_armed_ || o.armed;
    }
    return &rules_[i];
  }
  return nullptr;
}

std::string FaultInjector::report() const {
  std::string out;
  for (size_t i = 0; i < rules_.size(); ++i) {
    out += "inject " + rules_[i].text + ": " + std::to_string(states_[i].events) + " events, " +
           std::to_string(states_[i].injected) + " requests failed\n";
  }
  return out;
}

}  // namespace uqcow
