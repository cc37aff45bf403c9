#!/usr/bin/env bash
# Fuzz smoke test: build every cargo-fuzz target in fuzz/ on STABLE Rust and run
# each one for a bounded time. Exits non-zero if any target fails to build or
# finds a crash (panic, failed assertion, abort, timeout, out-of-memory).
#
# Usage: scripts/fuzz-smoke.sh [target ...]        (default: all targets)
# Environment:
#   FUZZ_SECONDS  seconds per target            (default 20)
#   FUZZ_RUNS     max executions per target     (default 20000000)
#
# Stable Rust: cargo-fuzz's default AddressSanitizer needs `-Zsanitizer`
# (nightly), so the build here passes `--sanitizer none`. Nothing else
# needs nightly: the coverage instrumentation cargo-fuzz adds is `-C` flags,
# and `--build-std` is off by default. Builds are release + debug assertions
# (overflow checks on), cargo-fuzz's default.
#
# Crashes land in fuzz/artifacts/<target>/; reproduce one with
#   cargo fuzz run --sanitizer none <target> fuzz/artifacts/<target>/<file>
# New corpus entries go to fuzz/corpus/<target>/ (gitignored); the committed
# seeds in fuzz/seeds/<target>/ are read as an extra corpus directory.
set -euo pipefail

CARGO_FUZZ_VERSION="0.13.2"
FUZZ_SECONDS="${FUZZ_SECONDS:-20}"
FUZZ_RUNS="${FUZZ_RUNS:-20000000}"
SANITIZER_FLAGS=(--sanitizer none)

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

run() {
    echo "+ $*" >&2
    "$@"
}

installed="$(cargo fuzz --version 2>/dev/null || true)"
if [[ "$installed" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
    echo "cargo-fuzz $CARGO_FUZZ_VERSION not found (have: ${installed:-none}); installing it" >&2
    run cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi
if [[ ${#targets[@]} -eq 0 ]]; then
    echo "no fuzz targets found" >&2
    exit 1
fi

start=$SECONDS
run cargo fuzz build "${SANITIZER_FLAGS[@]}"
echo "build: $((SECONDS - start))s" >&2

bin_dir="fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release"
logs="fuzz/target/fuzz-smoke-logs"
mkdir -p "$logs"
failed=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/seeds/$t"
    log="$logs/$t.log"
    t0=$SECONDS
    mkdir -p "fuzz/artifacts/$t"
    # The binaries built above are run directly (what `cargo fuzz run` does
    # after building), so every target runs the code of that one build even
    # if sources change meanwhile. First corpus dir receives new inputs.
    # -timeout: one input taking longer than 10 s counts as a crash (a hang).
    if run "$bin_dir/$t" -artifact_prefix="fuzz/artifacts/$t/" \
        -max_total_time="$FUZZ_SECONDS" -runs="$FUZZ_RUNS" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 "fuzz/corpus/$t" "fuzz/seeds/$t" >"$log" 2>&1; then
        summary="$(grep -E '^Done [0-9]+ runs' "$log" | tail -1 || true)"
        cov="$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 | sed -E 's/.*(cov: [0-9]+).*(corp: [^ ]+).*/\1 \2/' || true)"
        echo "ok    $t ($((SECONDS - t0))s): ${summary:-?} ${cov}" >&2
    else
        echo "FAIL  $t ($((SECONDS - t0))s); from $log:" >&2
        # the panic / libFuzzer error and the artifact path, else the log's end
        report="$(sed -n '/panicked at\|ERROR: libFuzzer\|==[0-9]*== ERROR/,/Test unit written to/p' "$log" | head -n 80 || true)"
        if [[ -n "$report" ]]; then echo "$report" >&2; else tail -n 40 "$log" >&2; fi
        failed+=("$t")
    fi
done

echo "total: $((SECONDS - start))s" >&2
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "crashing targets: ${failed[*]} (inputs in fuzz/artifacts/<target>/;" \
        "reproduce: cargo fuzz run --sanitizer none <target> <artifact>)" >&2
    exit 1
fi
echo "all ${#targets[@]} fuzz targets ran without a crash" >&2
