// uqcow snapshot: list, create, apply and delete internal snapshots, like
// qemu-img snapshot.
#include <cstdio>
#include <ctime>

#include "block/open.h"
#include "qcow2/image.h"
#include "tools/cli.h"

namespace uqcow::cli {
namespace {

constexpr char kUsage[] = "uqcow snapshot [-f FMT] [-l | -c NAME | -a NAME | -d NAME] FILE";
constexpr char kDescription[] =
    "List (-l, the default), create (-c), apply (-a) or delete (-d) internal\n"
    "snapshots of a qcow2 image. -a and -d take a snapshot id or name.";

enum class Action { kList, kCreate, kApply, kDelete };

// One row of qemu-img's bdrv_snapshot_dump().
void print_row(const char* id, const char* tag, const char* vm_size, const char* date, const char* clock,
               const char* icount) {
  std::printf("%-9s %-16s %8s%20s%13s%11s\n", id, tag, vm_size, date, clock, icount);
}

void list(const std::vector<qcow2::Snapshot>& snapshots) {
  if (snapshots.empty()) return;  // qemu-img prints nothing then
  std::printf("Snapshot list:\n");
  print_row("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
  for (const auto& s : snapshots) {
    char date[32] = "";
    time_t t = s.date_sec;
    struct tm tm;
    localtime_r(&t, &tm);
    std::strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S", &tm);
    const uint64_t secs = s.vm_clock_nsec / 1000000000;
    char clock[48];
    std::snprintf(clock, sizeof clock, "%02d:%02d:%02d.%03d", static_cast<int>(secs / 3600),
                  static_cast<int>((secs / 60) % 60), static_cast<int>(secs % 60),
                  static_cast<int>((s.vm_clock_nsec / 1000000) % 1000));
    std::string icount = s.has_icount && s.icount != UINT64_MAX ? std::to_string(s.icount) : "";
    print_row(s.id.c_str(), s.name.c_str(), human_size(s.vm_state_size).c_str(), date, clock, icount.c_str());
  }
}

Task<Status> snapshot(const std::string& path, const OpenOptions& o, Action action, const std::string& name) {
  UQ_CO_ASSIGN_OR_RETURN(auto disk, co_await open_disk(path, o));
  Disk& d = *disk;
  Status s;
  auto* q = dynamic_cast<qcow2::Qcow2Image*>(&d);
  if (!q) {
    s = Error(ENOTSUP, path + ": internal snapshots need a qcow2 image");
  } else if (action == Action::kList) {
    list(q->snapshots());
  } else if (action == Action::kCreate) {
    s = co_await q->snapshot_create(name);
    if (!s.ok()) s = s.error().with_context("Could not create snapshot '" + name + "'");
  } else if (action == Action::kApply) {
    s = co_await q->snapshot_apply(name);
    if (!s.ok()) s = s.error().with_context("Could not apply snapshot '" + name + "'");
  } else {
    s = co_await q->snapshot_delete(name);
    if (!s.ok()) s = s.error().with_context("Could not delete snapshot '" + name + "'");
  }
  Status c = co_await d.close();
  co_return s.ok() ? c : s;
}

}  // namespace

int cmd_snapshot(int argc, char** argv) {
  Args args;
  args.flag("-l,--list", "list the snapshots")
      .option("-c,--create", "create snapshot NAME", "NAME")
      .option("-a,--apply", "revert the image to snapshot NAME", "NAME")
      .option("-d,--delete", "delete snapshot NAME", "NAME")
      .flag("-q,--quiet", "print nothing");
  add_open_flags(args);
  Status parsed = args.parse(argc, argv);
  if (!parsed.ok()) return fail(parsed);
  if (args.help_requested()) {
    print_help(kUsage, kDescription, args);
    return 0;
  }
  if (args.positional().size() != 1) return fail(std::string("usage: ") + kUsage);
  int chosen = args.has("-l") + args.has("-c") + args.has("-a") + args.has("-d");
  if (chosen > 1) return fail("Cannot mix '-l', '-a', '-c', '-d'");
  Action action = Action::kList;
  std::string name;
  if (auto v = args.get("-c")) action = Action::kCreate, name = *v;
  if (auto v = args.get("-a")) action = Action::kApply, name = *v;
  if (auto v = args.get("-d")) action = Action::kDelete, name = *v;
  auto o = open_options(args, action == Action::kList);
  if (!o.ok()) return fail(o.error().message());
  o->no_backing = true;
  Status s = run(snapshot(args.positional()[0], *o, action, name));
  if (!s.ok()) return fail(s);
  return 0;
}

}  // namespace uqcow::cli
