#!/usr/bin/env bash
# Runs every fuzz target for a short while (FUZZ_SECONDS, default 15 s each) from its seed
# corpus: what CI does. The longer run is in docs/SECURITY.md.
#
# cargo-fuzz drives libFuzzer with nightly-only -Z flags; on a stable toolchain
# RUSTC_BOOTSTRAP=1 lets rustc take them (no nightly needed). The seeds in corpus/<target>/
# are read, never written: what a run finds goes to a temporary directory, and a crash to
# artifacts/<target>/ (which the failure message names).
#
# FUZZ_SANITIZER: none (default: the crate forbids unsafe code, and it builds faster) or
# address.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-15}"
sanitizer="${FUZZ_SANITIZER:-none}"
targets=(command reply data rules tlsrpt mta_sts ehlo fleet)

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

flags=(--release --debug-assertions --sanitizer "$sanitizer")

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cargo fuzz build "${flags[@]}"
for target in "${targets[@]}"; do
  mkdir -p "$work/$target"
  echo "fuzz: $target for ${seconds}s"
  cargo fuzz run "${flags[@]}" "$target" "$work/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -print_final_stats=1
done
echo "fuzz: ${#targets[@]} targets ran ${seconds}s each without a finding"
