#!/usr/bin/env bash
# Runs every check and test of the project on a fresh Debian 12 machine, as root.
# It installs what the tests need, sets up what they use (loop devices), runs format, lint,
# unit, property, end-to-end, CLI, scenario, golden-vector, kill -9 torture, benchmark-smoke and
# fuzz-smoke checks, and leaves nothing behind (no loop device attached, no trace instance, no server
# running: the tests start Azurite and Garage on free local ports and stop them by PID).
#
#   scripts/test.sh            everything
#   scripts/test.sh --quick    format, lint and tests only (no bench or fuzz smoke)
#
# Environment: COMPARE_SIZE (image of the side-by-side comparison, default 2G: ~9 GiB of disk and
# ~5 GiB of memory free), TORTURE_KILLS (30), SIM_SEEDS (24).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
[[ "${1:-}" == "--quick" ]] && quick=1

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
started=$SECONDS

step "checking the machine"
[[ $(id -u) -eq 0 ]] || die "the tests attach loop devices and must run as root (sudo scripts/test.sh)"
command -v cargo >/dev/null || die "cargo not found: install Rust stable with rustup (https://rustup.rs)"
missing=()
command -v losetup >/dev/null || missing+=(mount)
command -v cc >/dev/null || missing+=(gcc libc6-dev)
command -v make >/dev/null || missing+=(make)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v fio >/dev/null || missing+=(fio)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
command -v blkdiscard >/dev/null || missing+=(util-linux)
command -v cmp >/dev/null || missing+=(diffutils)
command -v qemu-img >/dev/null || missing+=(qemu-utils)
if ((${#missing[@]})); then
    step "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked --version 0.9.143
if [[ ! -e /dev/loop-control ]]; then
    modprobe loop 2>/dev/null || die "no /dev/loop-control and 'modprobe loop' failed: this kernel needs loop device support"
fi
loops_before=$(losetup -a | sort)
# The kernel tracker tests read block events from tracefs.
tracefs_mounted_here=0
if [[ ! -d /sys/kernel/tracing/instances ]]; then
    mount -t tracefs nodev /sys/kernel/tracing \
        || die "cannot mount tracefs at /sys/kernel/tracing: the kernel tracker tests need a kernel with tracing support"
    tracefs_mounted_here=1
fi

step "object-storage servers for the tests (Azurite from npm, Garage from crates.io)"
scripts/setup-tools.sh

cleanup() {
    local loops_after leftover
    leftover=$(find /sys/kernel/tracing/instances -maxdepth 1 -name 'replicator-ktrack-*' 2>/dev/null || true)
    if [[ -n "$leftover" ]]; then
        echo "error: trace instances were left by the tests:" >&2
        echo "$leftover" >&2
        echo "$leftover" | xargs -r -n1 rmdir || true
        exit 1
    fi
    if ((tracefs_mounted_here)); then
        umount /sys/kernel/tracing || true
    fi
    loops_after=$(losetup -a | sort)
    if [[ "$loops_after" != "$loops_before" ]]; then
        echo "error: loop devices were left attached by the tests:" >&2
        comm -13 <(echo "$loops_before") <(echo "$loops_after") >&2
        comm -13 <(echo "$loops_before") <(echo "$loops_after") | cut -d: -f1 | xargs -r -n1 losetup -d || true
        exit 1
    fi
}
trap cleanup EXIT

step "format"
cargo fmt --all -- --check

step "lint"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests"
# The scenario files of scenarios/ run in this step too (harness/tests/scenarios.rs, in the
# loop-devices test group): loop devices, the kernel tracker, fio and qemu-img, up to 128 loop
# devices at once; a failing one prints its summary and names the failed expectations.
# nextest captures test output: the hostile cache table (replicator-core/tests/hostile_cache.rs)
# is written to a file and shown here, also when a test failed.
hostile_table="${CARGO_TARGET_DIR:-target}/hostile-cache-table.md"
rm -f "$hostile_table"
tests_status=0
cargo nextest run --workspace --locked --no-fail-fast --profile ci || tests_status=$?
if [[ -f "$hostile_table" ]]; then
    step "hostile cache table: every manipulation of the cache, caught before the target"
    cat "$hostile_table"
fi
((tests_status == 0)) || die "tests failed (see above)"
cargo test --workspace --doc --locked

step "kill -9 torture: ship and hydrate killed ${TORTURE_KILLS:=30} times under a live workload"
# The nonce check must catch a crafted reuse, then a short torture (the full run is 200 kills,
# see README "Reliability"). It uses the debug harness the tests built.
benches/torture.sh selftest
cargo build -p harness --locked --quiet
TORTURE_KILLS=$TORTURE_KILLS HARNESS="${CARGO_TARGET_DIR:-target}/debug/harness" benches/torture.sh

if ((quick == 0)); then
    step "benchmarks compile and run once (criterion --test)"
    cargo bench -p replicator-benches --locked -- --test

    step "engine figures, measured (bitmap, blob codec, pipeline; quick mode, release build)"
    cargo run -p replicator-benches --release --locked --quiet --bin figures -- --quick \
        --out "${CARGO_TARGET_DIR:-target}/bench-figures.md"

    step "side by side with dd, zstd, qemu-img, restic, borg, rsync and fio (${COMPARE_SIZE:=2G} image)"
    # Installs the peers it needs, builds the release harness, prints its table (also written to
    # <target>/compare/table.md); fails on any tool's error or a target that differs, not on a ratio.
    # 2 GiB: on a 512 MiB image the 1 % delta is 5 MiB, which fio reads and writes in about 13 ms
    # while the two processes' fixed costs alone are about 25 ms (README, Performance).
    SIZE=$COMPARE_SIZE benches/compare.sh

    step "deterministic simulation: ${SIM_SEEDS:=24} seeds, release build, with its figures"
    # The nextest run above already ran the fixed seeds in debug; this prints the rate.
    cargo run -p replicator-sim --release --locked --quiet -- --seeds "$SIM_SEEDS" --steps 200

    step "fuzz smoke"
    scripts/fuzz-smoke.sh
fi

step "all checks passed in $((SECONDS - started)) s"
