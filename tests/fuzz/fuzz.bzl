"""One fuzz target: a libFuzzer binary and a regression test over the corpus."""

def uqcow_fuzz_target(name, deps = []):
    """Defines NAME (libFuzzer binary, manual) and NAME_regression_test.

    NAME.cc defines LLVMFuzzerTestOneInput. The binary needs --config=fuzz
    (clang, -fsanitize=fuzzer) and is tagged manual so that `bazel test //...`
    with gcc skips it. The regression test links the same entry point with
    regression_test.cc and runs it over corpus/ and regressions/NAME/.
    """
    native.cc_library(
        name = name + "_entry",
        testonly = True,
        srcs = [name + ".cc"],
        deps = deps,
        alwayslink = True,
    )
    native.cc_binary(
        name = name,
        testonly = True,
        tags = ["manual"],
        deps = [":" + name + "_entry"],
    )
    native.cc_test(
        name = name + "_regression_test",
        size = "small",
        srcs = ["regression_test.cc"],
        data = native.glob(["corpus/*", "regressions/" + name + "/*"], allow_empty = True),
        env = {"FUZZ_INPUTS": "tests/fuzz/corpus tests/fuzz/regressions/" + name},
        deps = [
            ":" + name + "_entry",
            "@system//:gtest_main",
        ],
    )
