// Runs one fuzz target's LLVMFuzzerTestOneInput over the committed seed
// corpus and every crash reproducer found so far, as a plain gtest built by
// gcc, so that normal and --config=asan runs exercise the fuzz entry points
// without clang or libFuzzer.
//
// $FUZZ_INPUTS lists the input directories (space-separated, relative to the
// runfiles root), set by the uqcow_fuzz_target macro in BUILD.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

std::vector<std::string> input_files() {
  std::vector<std::string> files;
  const char* dirs = std::getenv("FUZZ_INPUTS");
  std::istringstream list(dirs != nullptr ? dirs : "");
  for (std::string dir; list >> dir;) {
    if (!std::filesystem::is_directory(dir)) continue;
    for (const auto& entry : std::filesystem::directory_iterator(dir)) {
      if (entry.is_regular_file() && entry.path().filename() != "README") {
        files.push_back(entry.path().string());
      }
    }
  }
  std::sort(files.begin(), files.end());
  return files;
}

TEST(FuzzRegression, EveryCorpusInputAndReproducer) {
  std::vector<std::string> files = input_files();
  // Never pass by finding nothing: the seed corpus alone has 20 images.
  ASSERT_GE(files.size(), 10u) << "FUZZ_INPUTS=" << (std::getenv("FUZZ_INPUTS") ?: "(unset)");
  for (const std::string& file : files) {
    std::ifstream in(file, std::ios::binary);
    ASSERT_TRUE(in) << file;
    std::vector<uint8_t> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    // A crash reports no test name; this line says which input it was.
    std::fprintf(stderr, "input %s (%zu bytes)\n", file.c_str(), data.size());
    LLVMFuzzerTestOneInput(data.data(), data.size());
    // Also the input cut short, as a fuzzer would try: the first 4 KiB.
    if (data.size() > 4096) LLVMFuzzerTestOneInput(data.data(), 4096);
  }
}

}  // namespace
