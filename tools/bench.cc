// uqcow bench: random and sequential I/O throughput on an image, cache-size
// sweeps with plots, --advise. The workload engine lives in bench/.
#include <unistd.h>

#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>

#include "bench/workload.h"
#include "block/open.h"
#include "qcow2/image.h"
#include "tools/cli.h"

namespace uqcow::cli {
namespace {

constexpr char kUsage[] = "uqcow bench [options] FILE [FILE...]";
constexpr char kDescription[] =
    "Benchmark I/O on a qcow2 or raw image through the engine.\n"
    "  --sweep KEY=V1,V2,...  repeat the run for each value of l2-cache-size or\n"
    "                         l2-cache-entry-size; --csv/--json/--plot save the curve.\n"
    "  --advise               print the L2 cache size that covers the image and exit.\n"
    "With --jobs N, each job runs its own reactor thread: on its own FILE when N\n"
    "files are given, else on its own slice of a raw file, or (reads only) on the\n"
    "same qcow2 image opened once per job.";

struct RunStats {
  std::vector<bench::JobResult> jobs;
  bench::JobResult total;
  qcow2::CacheStats l2;
  uint64_t l2_bytes = 0;
  std::string format;
};

struct Config {
  bench::Workload workload;
  OpenOptions open;
  std::vector<std::string> files;
  unsigned jobs = 1;
  bool progress = false;
};

Task<Result<bench::JobResult>> job_task(const Config& c, unsigned index, RunStats& stats,
                                        bench::ProgressFn progress) {
  const std::string& file = c.files.size() > 1 ? c.files[index] : c.files[0];
  OpenOptions o = c.open;
  bench::Workload w = c.workload;
  UQ_CO_ASSIGN_OR_RETURN(auto disk, co_await open_disk(file, o));
  if (c.jobs > 1 && c.files.size() == 1) {
    // One raw file shared by the jobs: each gets its own slice.
    uint64_t range = (w.size ? w.size : disk->size() - w.offset) / c.jobs;
    range -= range % w.block_size;
    w.offset += index * range;
    w.size = range;
  }
  w.seed += index * 1000003ull;
  auto r = co_await bench::run_job(*disk, w, index == 0 ? progress : nullptr);
  if (index == 0) {
    stats.format = disk->format_name();
    if (auto* q = dynamic_cast<qcow2::Qcow2Image*>(disk.get())) {
      stats.l2 = q->l2_cache().stats();
      stats.l2_bytes = uint64_t{q->l2_cache().capacity()} * q->l2_cache().entry_size();
    }
  }
  Status closed = co_await disk->close();
  if (r.ok() && !closed.ok()) co_return closed.error();
  co_return r;
}

Result<RunStats> run_all(const Config& c) {
  RunStats stats;
  stats.jobs.resize(c.jobs);
  std::vector<Status> errors(c.jobs);
  bool tty = c.progress && isatty(STDERR_FILENO);
  bench::ProgressFn progress;
  if (tty) {
    progress = [jobs = c.jobs](uint64_t ios, double s) {
      std::fprintf(stderr, "\r  %5.1fs  %10.0f IOPS%s", s, s > 0 ? static_cast<double>(ios) / s : 0.0,
                   jobs > 1 ? " (job 0)" : "");
      std::fflush(stderr);
    };
  }
  auto body = [&](unsigned i) {
    auto r = run(job_task(c, i, stats, progress));
    if (r.ok()) stats.jobs[i] = std::move(r).value();
    else errors[i] = std::move(r).error();
  };
  if (c.jobs == 1) {
    body(0);
  } else {
    std::vector<std::thread> threads;
    for (unsigned i = 0; i < c.jobs; ++i) threads.emplace_back(body, i);
    for (auto& t : threads) t.join();
  }
  if (tty) std::fprintf(stderr, "\r%60s\r", "");
  for (auto& e : errors) {
    if (!e.ok()) return e.error();
  }
  for (auto& j : stats.jobs) {
    stats.total.ios += j.ios;
    stats.total.reads += j.reads;
    stats.total.writes += j.writes;
    stats.total.bytes += j.bytes;
    stats.total.seconds = std::max(stats.total.seconds, j.seconds);
    stats.total.cpu_seconds += j.cpu_seconds;
    stats.total.latency.merge(j.latency);
    stats.total.verified_blocks += j.verified_blocks;
    stats.total.verify_errors += j.verify_errors;
    if (stats.total.first_verify_error.empty()) stats.total.first_verify_error = j.first_verify_error;
  }
  return stats;
}

double iops_of(const bench::JobResult& r) { return r.seconds > 0 ? static_cast<double>(r.ios) / r.seconds : 0; }
double bw_of(const bench::JobResult& r) { return r.seconds > 0 ? static_cast<double>(r.bytes) / r.seconds : 0; }
double cpu_ns_per_io(const bench::JobResult& r) { return r.ios ? r.cpu_seconds * 1e9 / static_cast<double>(r.ios) : 0; }

std::string us(uint64_t ns) {
  char b[32];
  std::snprintf(b, sizeof b, ns >= 10000000 ? "%.1fms" : "%.1fus", ns >= 10000000 ? ns / 1e6 : ns / 1e3);
  return b;
}

void print_row(const char* name, const bench::JobResult& r) {
  std::printf("%-6s %11.0f %9.1f %9s %9s %9s %9s %9s %9.0f\n", name, iops_of(r), bw_of(r) / 1048576.0,
              us(static_cast<uint64_t>(r.latency.mean())).c_str(), us(r.latency.percentile(0.5)).c_str(),
              us(r.latency.percentile(0.99)).c_str(), us(r.latency.percentile(0.999)).c_str(),
              us(r.latency.max()).c_str(), cpu_ns_per_io(r));
}

void print_human(const Config& c, const RunStats& s) {
  const auto& w = c.workload;
  std::printf("uqcow bench: %s bs=%" PRIu64 " depth=%u jobs=%u %s on %s (%s)\n",
              bench::pattern_name(w.pattern), w.block_size, w.depth, c.jobs,
              w.count ? ("count=" + std::to_string(w.count)).c_str()
                      : ("runtime=" + std::to_string(w.runtime_s).substr(0, 4) + "s").c_str(),
              c.files[0].c_str(), s.format.c_str());
  std::printf("%-6s %11s %9s %9s %9s %9s %9s %9s %9s\n", "job", "IOPS", "MiB/s", "lat mean", "p50", "p99",
              "p99.9", "max", "CPU ns/IO");
  if (c.jobs > 1) {
    for (unsigned i = 0; i < c.jobs; ++i) print_row(std::to_string(i).c_str(), s.jobs[i]);
  }
  print_row(c.jobs > 1 ? "total" : "all", s.total);
  if (s.format == "qcow2") {
    std::printf("L2 cache (job 0): %" PRIu64 " hits, %" PRIu64 " misses, %" PRIu64 " evictions, %s\n", s.l2.hits,
                s.l2.misses, s.l2.evictions, human_size(s.l2_bytes).c_str());
  }
  if (w.verify) {
    std::printf("verify: %" PRIu64 " blocks checked, %" PRIu64 " errors%s%s\n", s.total.verified_blocks,
                s.total.verify_errors, s.total.verify_errors ? ": " : "", s.total.first_verify_error.c_str());
  }
}

std::string json_result(const bench::JobResult& r) {
  std::ostringstream o;
  o << "{\"iops\": " << static_cast<uint64_t>(iops_of(r)) << ", \"bw_bytes\": " << static_cast<uint64_t>(bw_of(r))
    << ", \"ios\": " << r.ios << ", \"reads\": " << r.reads << ", \"writes\": " << r.writes
    << ", \"seconds\": " << r.seconds << ", \"lat_ns\": {\"mean\": " << static_cast<uint64_t>(r.latency.mean())
    << ", \"p50\": " << r.latency.percentile(0.5) << ", \"p99\": " << r.latency.percentile(0.99)
    << ", \"p999\": " << r.latency.percentile(0.999) << ", \"max\": " << r.latency.max()
    << "}, \"cpu_ns_per_io\": " << static_cast<uint64_t>(cpu_ns_per_io(r)) << "}";
  return o.str();
}

std::string json_stats(const Config& c, const RunStats& s) {
  const auto& w = c.workload;
  std::ostringstream o;
  std::string total = json_result(s.total);
  o << "{\"file\": " << json_string(c.files[0]) << ", \"format\": " << json_string(s.format)
    << ", \"rw\": \"" << bench::pattern_name(w.pattern) << "\", \"bs\": " << w.block_size
    << ", \"depth\": " << w.depth << ", \"jobs\": " << c.jobs << ", "
    << total.substr(1, total.size() - 2) << ", \"l2_cache\": {\"hits\": " << s.l2.hits
    << ", \"misses\": " << s.l2.misses << ", \"evictions\": " << s.l2.evictions
    << ", \"bytes\": " << s.l2_bytes << "}";
  if (w.verify) o << ", \"verify\": {\"blocks\": " << s.total.verified_blocks << ", \"errors\": " << s.total.verify_errors << "}";
  o << ", \"per_job\": [";
  for (size_t i = 0; i < s.jobs.size(); ++i) o << (i ? ", " : "") << json_result(s.jobs[i]);
  o << "]}";
  return o.str();
}

// The L2 cache size that maps the whole image: one entry per cluster.
Result<std::pair<uint64_t, uint64_t>> full_coverage(const std::string& file, const OpenOptions& base) {
  OpenOptions o = base;
  o.read_only = true;
  o.cache_clean_interval = 0;
  return run([&]() -> Task<Result<std::pair<uint64_t, uint64_t>>> {
    UQ_CO_ASSIGN_OR_RETURN(auto disk, co_await open_disk(file, o));
    auto* q = dynamic_cast<qcow2::Qcow2Image*>(disk.get());
    std::pair<uint64_t, uint64_t> r{0, 0};
    if (q) {
      const auto& g = q->geometry();
      r.first = (q->size() + g.cluster_size - 1) / g.cluster_size * g.l2_entry_size;
      r.second = g.cluster_size;
    }
    (void)co_await disk->close();
    if (!q) co_return Error(EINVAL, file + " is not a qcow2 image: it has no L2 cache");
    co_return r;
  }());
}

Status write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  if (!out) return errno_error(errno, "write " + path);
  return Status();
}

Status plot(const std::string& path, const std::string& key, const std::vector<std::pair<uint64_t, double>>& points,
            uint64_t coverage, const std::string& title) {
  // gnuplot (from Debian, installed by tools/bootstrap.sh) draws the curve.
  std::string data = path + ".dat";
  std::ostringstream d;
  for (auto& [x, y] : points) d << x / 1024.0 << " " << y << "\n";
  UQ_TRY(write_file(data, d.str()));
  bool png = path.size() > 4 && path.substr(path.size() - 4) == ".png";
  std::ostringstream g;
  g << "set terminal " << (png ? "pngcairo size 900,560" : "svg size 900,560 dynamic") << "\n"
    << "set output '" << path << "'\nset title '" << title << "'\nset logscale x 2\n"
    << "set xlabel '" << key << " (KiB)'\nset ylabel 'IOPS'\nset grid\nset key bottom right\n"
    << "set yrange [0:*]\n";
  if (coverage && key == "l2-cache-size") {
    g << "set arrow from " << coverage / 1024.0 << ", graph 0 to " << coverage / 1024.0
      << ", graph 1 nohead dt 2 lc rgb 'red'\n"
      << "set label 'covers the image (" << human_size(coverage) << ")' at " << coverage / 1024.0
      << ", graph 0.95 left offset 0.5,0 tc rgb 'red'\n";
  }
  g << "plot '" << data << "' using 1:2 with linespoints lw 2 pt 7 title 'uqcow IOPS'\n";
  std::string script = path + ".gp";
  UQ_TRY(write_file(script, g.str()));
  int rc = std::system(("gnuplot '" + script + "' 2>&1").c_str());
  std::remove(script.c_str());
  std::remove(data.c_str());
  if (rc != 0) return Error(EIO, "gnuplot failed to draw " + path + " (is gnuplot installed?)");
  return Status();
}

int run_sweep(Config& c, const Args& args, const std::string& spec) {
  auto eq = spec.find('=');
  std::string key = spec.substr(0, eq);
  if (eq == std::string::npos || (key != "l2-cache-size" && key != "l2-cache-entry-size")) {
    return fail("--sweep: expected l2-cache-size=V1,V2,... or l2-cache-entry-size=V1,V2,...");
  }
  std::vector<uint64_t> values;
  std::stringstream ss(spec.substr(eq + 1));
  for (std::string v; std::getline(ss, v, ',');) {
    auto n = parse_size(v, "--sweep");
    if (!n.ok()) return fail(n.error().message());
    values.push_back(*n);
  }
  auto cov = full_coverage(c.files[0], c.open);
  if (!cov.ok()) return fail(cov.error().message());
  std::vector<std::pair<uint64_t, double>> points;
  std::ostringstream csv, json;
  csv << key << ",iops,bw_bytes,lat_mean_ns,lat_p99_ns,cpu_ns_per_io,l2_hits,l2_misses\n";
  json << "{\"sweep\": \"" << key << "\", \"full_coverage_bytes\": " << cov->first << ", \"points\": [";
  std::printf("%-20s %11s %9s %9s %9s %12s %12s\n", key.c_str(), "IOPS", "MiB/s", "lat mean", "p99", "L2 hits", "L2 misses");
  for (size_t i = 0; i < values.size(); ++i) {
    Config run_cfg = c;
    if (key == "l2-cache-size") run_cfg.open.l2_cache_size = values[i];
    else run_cfg.open.l2_cache_entry_size = values[i];
    auto s = run_all(run_cfg);
    if (!s.ok()) return fail(s.error().message());
    const auto& t = s->total;
    std::printf("%-20s %11.0f %9.1f %9s %9s %12" PRIu64 " %12" PRIu64 "\n", human_size(values[i]).c_str(), iops_of(t),
                bw_of(t) / 1048576.0, us(static_cast<uint64_t>(t.latency.mean())).c_str(),
                us(t.latency.percentile(0.99)).c_str(), s->l2.hits, s->l2.misses);
    std::fflush(stdout);
    points.emplace_back(values[i], iops_of(t));
    csv << values[i] << "," << static_cast<uint64_t>(iops_of(t)) << "," << static_cast<uint64_t>(bw_of(t)) << ","
        << static_cast<uint64_t>(t.latency.mean()) << "," << t.latency.percentile(0.99) << ","
        << static_cast<uint64_t>(cpu_ns_per_io(t)) << "," << s->l2.hits << "," << s->l2.misses << "\n";
    json << (i ? ", " : "") << "{\"" << key << "\": " << values[i] << ", \"result\": " << json_stats(run_cfg, *s) << "}";
  }
  json << "]}\n";
  std::printf("full coverage: l2-cache-size %s (cluster size %s)\n", human_size(cov->first).c_str(),
              human_size(cov->second).c_str());
  if (auto f = args.get("--csv")) {
    Status s = write_file(*f, csv.str());
    if (!s.ok()) return fail(s);
  }
  if (auto f = args.get("--json")) {
    Status s = write_file(*f, json.str());
    if (!s.ok()) return fail(s);
  }
  if (auto f = args.get("--plot")) {
    std::string title = std::string(bench::pattern_name(c.workload.pattern)) + " bs=" +
                        std::to_string(c.workload.block_size) + " depth=" + std::to_string(c.workload.depth);
    Status s = plot(*f, key, points, key == "l2-cache-size" ? cov->first : 0, title);
    if (!s.ok()) return fail(s);
    std::printf("plot: %s\n", f->c_str());
  }
  return 0;
}

Status parse_workload(const Args& args, Config& c) {
  auto& w = c.workload;
  auto size_opt = [&](const char* name, uint64_t& field) -> Status {
    if (auto v = args.get(name)) {
      UQ_ASSIGN_OR_RETURN(field, parse_size(*v, name));
    }
    return Status();
  };
  UQ_ASSIGN_OR_RETURN(w.pattern, bench::parse_pattern(args.get_or("--rw", "randread")));
  UQ_TRY(size_opt("--bs", w.block_size));
  UQ_TRY(size_opt("--offset", w.offset));
  UQ_TRY(size_opt("--size", w.size));
  UQ_TRY(size_opt("--step", w.step));
  w.depth = static_cast<unsigned>(std::stoul(args.get_or("--depth", "32")));
  w.rwmix_read = static_cast<unsigned>(std::stoul(args.get_or("--rwmix-read", "50")));
  w.seed = std::stoull(args.get_or("--seed", "1"));
  w.flush_interval = std::stoull(args.get_or("--flush-interval", "0"));
  w.count = std::stoull(args.get_or("--count", "0"));
  w.runtime_s = std::stod(args.get_or("--runtime", w.count ? "0" : "5"));
  w.warmup_s = std::stod(args.get_or("--warmup", "0"));
  w.verify = args.has("--verify");
  c.jobs = static_cast<unsigned>(std::stoul(args.get_or("--jobs", "1")));
  if (c.jobs == 0 || c.jobs > 64) return Error(EINVAL, "--jobs: 1..64");
  if (w.rwmix_read > 100) return Error(EINVAL, "--rwmix-read: 0..100");
  return Status();
}

}  // namespace

int cmd_bench(int argc, char** argv) {
  Args args;
  args.option("--rw", "randread (default), randwrite, randrw, read, write", "PATTERN")
      .option("--rwmix-read", "percent reads for randrw (default 50)", "PCT")
      .option("--bs", "block size (default 4k)", "SIZE")
      .option("--depth,-d", "requests in flight per job (default 32)", "N")
      .option("--runtime", "seconds to run (default 5)", "SECONDS")
      .option("--count", "stop after N requests instead of a runtime", "N")
      .option("--warmup", "seconds to run before measuring", "SECONDS")
      .option("--offset", "start of the range (default 0)", "SIZE")
      .option("--size", "length of the range (default: to the end)", "SIZE")
      .option("--step", "sequential stride, as qemu-img bench -S (default: bs)", "SIZE")
      .option("--seed", "seed of the random offsets (default 1)", "N")
      .option("--flush-interval", "flush after every N writes", "N")
      .flag("--verify", "stamp writes with (offset, generation) and read them all back")
      .option("--jobs", "reactor threads, one ring each (default 1)", "N")
      .option("--output", "human (default) or json", "FMT")
      .option("--sweep", "l2-cache-size=V1,V2,... or l2-cache-entry-size=...", "KEY=VALUES")
      .option("--csv", "with --sweep: write the points as CSV", "FILE")
      .option("--json", "with --sweep: write the points as JSON", "FILE")
      .option("--plot", "with --sweep: draw IOPS against the value (.svg or .png)", "FILE")
      .flag("--advise", "print the L2 cache size that covers the image and exit")
      .flag("-h,--help", "show this help");
  add_open_flags(args);
  Status parsed = args.parse(argc, argv);
  if (!parsed.ok()) return fail(parsed);
  if (args.has("-h")) {
    print_help(kUsage, kDescription, args);
    return 0;
  }
  Config c;
  c.files = args.positional();
  if (c.files.empty()) return fail(std::string("usage: ") + kUsage);
  Status s = parse_workload(args, c);
  if (!s.ok()) return fail(s);
  bool writes = c.workload.pattern != bench::Pattern::kRandRead && c.workload.pattern != bench::Pattern::kRead;
  auto open = open_options(args, !writes);
  if (!open.ok()) return fail(open.error().message());
  c.open = *open;
  c.progress = args.get_or("--output", "human") == "human";
  if (c.files.size() > 1 && c.files.size() != c.jobs) return fail("give one FILE, or one FILE per job");

  if (args.has("--advise")) {
    auto cov = full_coverage(c.files[0], c.open);
    if (!cov.ok()) return fail(cov.error().message());
    std::printf("%s: l2-cache-size=%s covers the whole image (%" PRIu64 " bytes of L2 cache memory; cluster size %s)\n",
                c.files[0].c_str(), human_size(cov->first).c_str(), cov->first, human_size(cov->second).c_str());
    return 0;
  }
  if (c.jobs > 1 && c.files.size() == 1 && writes) {
    auto fmt = c.open.format.empty() ? probe_format(c.files[0]) : Result<std::string>(c.open.format);
    if (!fmt.ok()) return fail(fmt.error().message());
    if (*fmt != "raw") return fail("--jobs with writes needs one image per job (or a raw file, which is sliced)");
  }
  if (auto sweep = args.get("--sweep")) return run_sweep(c, args, *sweep);

  auto stats = run_all(c);
  if (!stats.ok()) return fail(stats.error().message());
  if (args.get_or("--output", "human") == "json") {
    std::printf("%s\n", json_stats(c, *stats).c_str());
  } else {
    print_human(c, *stats);
  }
  return stats->total.verify_errors ? 1 : 0;
}

}  // namespace uqcow::cli
