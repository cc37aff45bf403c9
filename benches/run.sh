#!/usr/bin/env bash
# Runs the replicator's criterion benchmarks and says where criterion wrote the results.
#
#   benches/run.sh                 # everything (about 15 minutes after the build on 2 cores,
#                                  # half of it the 10-million-write bitmap on a 64 TiB disk)
#   benches/run.sh cycle           # only benchmarks whose id contains "cycle"
#   benches/run.sh --test          # each benchmark once, as CI does (a few seconds)
#   benches/run.sh --save-baseline before   # then later: --baseline before
#
# For the same figures measured once and printed as tables:
#   cargo run --release -p replicator-benches --bin figures [-- --quick]
# Side by side with peer tools (dd, zstd, qemu-img, restic, borg, rsync, fio): benches/compare.sh.
#
# Arguments go to criterion (after cargo's `--`). Plots are off (`--noplot`): the numbers are in
# the console output and in <target>/criterion/<group>/<bench>/new/estimates.json.
set -euo pipefail

cd "$(dirname "$0")/.."

marker=$(mktemp)
trap 'rm -f "$marker"' EXIT
start=$(date +%s)
cargo bench -p replicator-benches -- --noplot "$@"
end=$(date +%s)

# Where criterion writes: $CRITERION_HOME, else <cargo target dir>/criterion.
if [[ -n "${CRITERION_HOME:-}" ]]; then
    out="$CRITERION_HOME"
else
    target=$(cargo metadata --format-version 1 --no-deps |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    out="${target:-target}/criterion"
fi

echo
echo "benchmarks took $((end - start)) s (wall clock, including any build)"
if [[ -d "$out" ]]; then
    echo "criterion results: $out"
    echo "  per benchmark: $out/<group>/<benchmark>/new/estimates.json (times in ns)"
    if [[ -f "$out/report/index.html" ]]; then
        echo "  html report:   $out/report/index.html"
    fi
    # A summary of the benchmarks this run measured: median time and median throughput.
    mapfile -d '' fresh < <(find "$out" -path '*/new/estimates.json' -newer "$marker" -print0)
    if ((${#fresh[@]})) && command -v python3 >/dev/null; then
        python3 - "${fresh[@]}" <<'PY'
import json, os, sys
rows = []
for est_path in sys.argv[1:]:
    d = os.path.dirname(est_path)
    est = json.load(open(est_path))
    bench = json.load(open(os.path.join(d, "benchmark.json")))
    ns = est["median"]["point_estimate"]
    thr = bench.get("throughput") or {}
    if "Bytes" in thr:
        rate = f"{thr['Bytes'] / (ns / 1e9) / 2**20:10.1f} MiB/s"
    elif "Elements" in thr:
        rate = f"{thr['Elements'] / (ns / 1e9) / 1e6:10.3f} Melem/s"
    else:
        rate = ""
    if ns >= 1e6:
        t = f"{ns / 1e6:10.3f} ms"
    elif ns >= 1e3:
        t = f"{ns / 1e3:10.3f} us"
    else:
        t = f"{ns:10.3f} ns"
    rows.append((bench["full_id"], t, rate))
if rows:
    w = max(len(r[0]) for r in rows)
    print()
    print(f"{'benchmark':<{w}}  {'median':>13}  {'median throughput':>17}")
    for name, t, rate in sorted(rows):
        print(f"{name:<{w}}  {t:>13}  {rate:>17}")
PY
    fi
else
    echo "criterion wrote no results (test mode or nothing matched the filter); it would use $out"
fi
