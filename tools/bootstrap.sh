#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build, test and benchmark uqcow.
# Does nothing (and needs no network) when everything is already present.
set -euo pipefail

packages=(
  bazel-bootstrap g++ clang libclang-rt-14-dev
  liburing-dev zlib1g-dev libzstd-dev libssl-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  qemu-utils fio libnbd-bin gnuplot-nox
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "bootstrap: installing ${missing[*]}" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
