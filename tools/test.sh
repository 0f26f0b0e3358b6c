#!/usr/bin/env bash
# Runs every test: installs what is missing, then `bazel test //...`.
# Extra arguments go to bazel (e.g. --config=asan).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh
bazel test --test_output=errors --local_test_jobs=2 "$@" //...
