"""uqcow_test: the one cc_test stanza of //tests."""

def uqcow_test(name, deps = [], cli = False, srcs = None, data = [], env = {}, **kwargs):
    """A gtest test that links the shared test utilities (//tests:testutil).

    Args:
      name: the test; its source is `name + ".cc"` unless `srcs` is given.
      deps: further libraries (the test utilities and gtest_main are added).
      cli: the test runs the `uqcow` binary: //tools:uqcow becomes a data
        dependency, and $UQCOW names it (testutil's run_uqcow).
      srcs: the sources, when not just `name + ".cc"`.
      data: further data dependencies.
      env: further environment variables.
      **kwargs: passed to cc_test (size, shard_count, ...).
    """
    data = list(data)
    env = dict(env)
    if cli:
        data.append("//tools:uqcow")
        env["UQCOW"] = "$(rootpath //tools:uqcow)"
    common = ["//tests:testutil", "@system//:gtest_main"]
    native.cc_test(
        name = name,
        srcs = srcs if srcs != None else [name + ".cc"],
        data = data,
        env = env,
        deps = common + [d for d in deps if d not in common and d != ":testutil"],
        **kwargs
    )
