#!/usr/bin/env bash
# Side by side with the tools users would pick, on one realistic image, in one run (as root):
#
#   initial copy  ours (`harness ship`, cycle 1) vs `dd` reading the image (O_DIRECT); for context
#                 zstd -1 -T0, qemu-img convert to qcow2 (plain and zstd-compressed), restic and
#                 borg initial backups, an rsync full copy
#   hydrate       ours (`harness hydrate` into a fresh target image) vs `dd` writing as much (O_DIRECT)
#
#   Both are run three times, alternating with dd, and the medians compared: the disk's speed
#   here drifts by half from one minute to the next. Our cache is on its own device, as a staging
#   cache or object store is in use: a tmpfs mounted for the run (this machine has one disk). The
#   same with the cache on the source's own disk, where its writes share the disk with the reads,
#   is measured once and shown for context.
#   churn         1 % of the image rewritten in random 16 KiB pages through our tracker
#                 (`harness write --pattern innodb`), the same file every peer then reads
#   delta         ours (ship + hydrate, two processes) vs rsync --inplace --no-whole-file onto a
#                 copy of the pre-churn image, restic and borg incremental backups, and fio reading
#                 then writing as many random 16 KiB blocks at queue depth 32 (libaio, O_DIRECT):
#                 the "just read and write the changed blocks" floor. fio writes as our hydrate
#                 does: into an image allocated like our target (a sparse copy of the source),
#                 then fsync, since a target must be durable before it acknowledges
#   verify        our target equals the source (`harness verify` and `qemu-img compare`)
#
# The page cache is dropped before every timed step (then the tool's own program is loaded once,
# so short steps do not time reading a binary from disk). Each step's wall time, throughput, peak
# RSS and CPU time (/usr/bin/time) and bytes stored are printed as a markdown table, with the
# ratios the project aims at, each marked met or NOT met; the table is also written to
# $COMPARE_DIR/table.md.
# The script fails on any error of any tool or a target that differs, never on a ratio.
#
#   sudo benches/compare.sh                 # 4 GiB image (about 8 minutes, plus the build; ~16 GiB
#                                           # of disk and ~11 GiB of memory free)
#   sudo SIZE=2G benches/compare.sh         # what scripts/test.sh runs (about 4 minutes)
#
# Environment:
#   SIZE         image size, a whole number of MiB (512M, 4G; default 4G)
#   SEED         seed of the image content and of the churn (default 1)
#   COMPARE_DIR  where the table goes and the work directory is made, on a real disk, not tmpfs
#                (default <cargo target dir>/compare); the work directory is removed at the end
#   KEEP=1       keep the work directory (images, caches, repositories, logs)
#   HARNESS      a harness binary to use instead of building it (cargo build --release)
#   RESTIC_PASSWORD, BORG_PASSPHRASE   repository passwords (default: a fixed benchmark one);
#                both repositories are encrypted, as our cache is
set -euo pipefail
export LC_ALL=C

cd "$(dirname "$0")/.."
repo_root=$PWD

die() { printf 'compare: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'compare: %s\n' "$*" >&2; }

[[ $(id -u) -eq 0 ]] || die "run as root: it drops the page cache before each timed step (sudo benches/compare.sh)"
[[ -w /proc/sys/vm/drop_caches ]] || die "/proc/sys/vm/drop_caches is not writable: cannot drop the page cache"

SIZE=${SIZE:-4G}
SEED=${SEED:-1}
KEEP=${KEEP:-0}
size_bytes=$(numfmt --from=iec "$SIZE" 2>/dev/null) \
    || die "SIZE=$SIZE is not a size like 512M or 4G"
mib=$((1 << 20))
((size_bytes >= 64 * mib)) || die "SIZE=$SIZE is too small: use at least 64M (1 % churn must be several 16 KiB pages)"
((size_bytes % mib == 0)) || die "SIZE=$SIZE must be a whole number of MiB (dd copies it in 1 MiB blocks)"
[[ $SEED =~ ^[0-9]+$ ]] || die "SEED=$SEED must be a non-negative integer"
# 1 % of the image in whole 16 KiB pages.
page=16384
churn_bytes=$((size_bytes / 100 / page * page))

# --- the peers, from Debian packages -----------------------------------------------------------
declare -A package_of=(
    [rsync]=rsync [restic]=restic [borg]=borgbackup [zstd]=zstd [fio]=fio
    [qemu-img]=qemu-utils [/usr/bin/time]=time [numfmt]=coreutils
)
missing=()
for cmd in "${!package_of[@]}"; do
    command -v "$cmd" >/dev/null || missing+=("${package_of[$cmd]}")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        apt-get update -qq || die "apt-get update failed"
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
            || die "cannot install ${missing[*]} (apt-get install -y --no-install-recommends ${missing[*]})"
    fi
fi
for cmd in "${!package_of[@]}"; do
    command -v "$cmd" >/dev/null || die "$cmd is missing after installing ${package_of[$cmd]}"
done

# --- where -------------------------------------------------------------------------------------
target_dir=${CARGO_TARGET_DIR:-$repo_root/target}
COMPARE_DIR=${COMPARE_DIR:-$target_dir/compare}
mkdir -p "$COMPARE_DIR"
COMPARE_DIR=$(cd "$COMPARE_DIR" && pwd)
fs_type=$(df --output=fstype "$COMPARE_DIR" | tail -n 1 | tr -d ' ')
[[ $fs_type != tmpfs && $fs_type != ramfs ]] \
    || die "COMPARE_DIR=$COMPARE_DIR is on $fs_type: disk timings need a real disk (the default is under target/)"
W=$(mktemp -d "$COMPARE_DIR/work.XXXXXX")
table_file="$COMPARE_DIR/table.md"
MEM=$W/mem
cleanup() {
    if mountpoint -q "$MEM" 2>/dev/null; then
        umount "$MEM" || say "could not unmount the tmpfs at $MEM: umount it by hand"
    fi
    # The logs are small: keep the last run's for a look after a failure.
    rm -rf -- "$COMPARE_DIR/logs"
    cp -r -- "$W/logs" "$COMPARE_DIR/logs" 2>/dev/null || true
    if [[ $KEEP == 1 ]]; then
        say "kept the work directory $W"
    else
        rm -rf -- "$W"
    fi
}
trap cleanup EXIT
mkdir -p "$W/logs"
# At the peak: the source, our cache and target, the rsync copy, the restic and borg repositories
# (peer outputs are removed once measured).
need_bytes=$((size_bytes * 4))
avail_bytes=$(df -B1 --output=avail "$W" | tail -1 | tr -d ' ')
((avail_bytes > need_bytes)) \
    || die "$W has $((avail_bytes / mib)) MiB free; a SIZE=$SIZE run needs about $((need_bytes / mib)) MiB"
# The cache's own device: room for the cache (at most the image, stored raw) and a copy of it.
mem_bytes=$((2 * size_bytes + 256 * mib))
mem_avail=$(($(sed -n 's/^MemAvailable: *\([0-9]*\) kB/\1/p' /proc/meminfo) * 1024))
((mem_avail > mem_bytes + 2048 * mib)) \
    || die "$((mem_avail / mib)) MiB of memory available; a SIZE=$SIZE run keeps its cache in a tmpfs of $((mem_bytes / mib)) MiB and needs 2 GiB more"
mkdir -p "$MEM"
mount -t tmpfs -o "size=$mem_bytes,mode=0700" tmpfs "$MEM" || die "cannot mount a tmpfs at $MEM"

# --- our binary ----------------------------------------------------------------------------------
if [[ -n ${HARNESS:-} ]]; then
    [[ -x $HARNESS ]] || die "HARNESS=$HARNESS is not an executable"
else
    say "building harness (release)"
    cargo build --release -p harness --locked --quiet || die "cargo build --release -p harness failed"
    HARNESS=$target_dir/release/harness
fi
commit=$(git -C "$repo_root" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$repo_root" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    commit="$commit (with uncommitted changes)"
fi

# --- measuring ---------------------------------------------------------------------------------
drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

# Set by `timed`: wall seconds, CPU seconds (user + system, all threads and children) and peak
# RSS (KiB) of the last command.
T_SEC=0
T_CPU=0
T_RSS_KB=0

# timed LABEL CMD...: drops the page cache, runs CMD under /usr/bin/time with its output in
# $W/logs/LABEL.log, and fails the script (showing the log) if it fails.
timed() {
    local label=$1
    shift
    local log="$W/logs/$label.log" tf="$W/logs/$label.time" t0 t1 rc=0
    drop_caches
    # The data is read cold, the tool's own program not: load it once (every tool answers
    # --version or at least starts), so a short step does not time reading a binary from disk.
    "$1" --version >/dev/null 2>&1 || true
    /usr/bin/time -f '' true 2>/dev/null || true
    say "$label: $*"
    t0=$EPOCHREALTIME
    /usr/bin/time -f '%e %M %U %S' -o "$tf" "$@" >"$log" 2>&1 || rc=$?
    t1=$EPOCHREALTIME
    if ((rc != 0)); then
        tail -n 30 "$log" >&2
        die "$label failed (exit $rc): $*; its log is above and in $COMPARE_DIR/logs/$label.log"
    fi
    T_SEC=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    T_RSS_KB=$(tail -n 1 "$tf" | awk '{ print $2 }')
    T_CPU=$(tail -n 1 "$tf" | awk '{ printf "%.2f", $3 + $4 }')
    [[ $T_RSS_KB =~ ^[0-9]+$ ]] || die "$label: cannot read the peak RSS from /usr/bin/time ($(cat "$tf"))"
}

# Apparent bytes under a path (files and directories).
bytes_of() { du -sb "$1" | cut -f1; }

rows=()
# row STEP TOOL SECONDS CPU_SECONDS BYTES_MOVED RSS_KB STORED_BYTES|- NOTES
row() {
    local step=$1 tool=$2 sec=$3 cpu=$4 moved=$5 rss=$6 stored=$7 notes=$8 rate stored_h
    rate=$(awk -v b="$moved" -v s="$sec" 'BEGIN { if (s > 0) printf "%.0f", b / s / 1e6; else print "-" }')
    if [[ $stored == - ]]; then
        stored_h=-
    else
        stored_h=$(awk -v b="$stored" 'BEGIN { printf "%.1f MiB", b / 1048576 }')
    fi
    # Prefixed with the step's rank, so the table lists steps in order whatever the run's order.
    local rank
    case $step in
        "initial copy") rank=1 ;;
        hydrate) rank=2 ;;
        churn) rank=3 ;;
        *) rank=4 ;;
    esac
    rows+=("$rank	| $step | $tool | $sec | $cpu | $rate | $(awk -v k="$rss" 'BEGIN { printf "%.0f MiB", k / 1024 }') | $stored_h | $notes |")
}
declare -A sec_of

IMG=$W/source.img
TGT=$W/target.img
KEY=$W/master.key
CACHE=$MEM/cache
export RESTIC_PASSWORD=${RESTIC_PASSWORD:-compare-benchmark}
export BORG_PASSPHRASE=${BORG_PASSPHRASE:-compare-benchmark}
export RESTIC_CACHE_DIR=$W/restic-cache
export BORG_BASE_DIR=$W/borg-home
export BORG_RELOCATED_REPO_ACCESS_IS_OK=yes

say "image: $SIZE, seed $SEED, in $W"
"$HARNESS" image --out "$IMG" --size "$SIZE" --seed "$SEED" --quiet >"$W/logs/image.log" 2>&1 \
    || { cat "$W/logs/image.log" >&2; die "harness image failed"; }
cat "$W/logs/image.log" >&2
"$HARNESS" keygen --out "$KEY" >/dev/null || die "harness keygen failed"
mb=$((size_bytes / mib))

# --- initial copy and hydrate, three rounds ----------------------------------------------------
# median3 A B C: the middle value. which_median A B C: its round (1-3).
median3() { printf '%s\n' "$@" | sort -g | sed -n 2p; }
which_median() {
    local m i=1
    m=$(median3 "$@")
    for v in "$@"; do
        [[ $v == "$m" ]] && { echo "$i"; return; }
        i=$((i + 1))
    done
}
rounds=(1 2 3)
# Indexed by round (1-3), so "${a[@]}" lists them in round order.
declare -a dd_read_s dd_read_cpu dd_read_rss ship_s ship_cpu ship_rss hyd_s hyd_cpu hyd_rss dd_write_s dd_write_cpu dd_write_rss
for r in "${rounds[@]}"; do
    timed "initial-dd-read-$r" dd if="$IMG" of=/dev/null iflag=direct bs=1M
    dd_read_s[$r]=$T_SEC dd_read_cpu[$r]=$T_CPU dd_read_rss[$r]=$T_RSS_KB
    timed "initial-ours-$r" "$HARNESS" ship --source "$IMG" --sink "$MEM/cache-$r" \
        --state "$W/src-state-$r" --key-file "$KEY"
    grep -q 'initial' "$W/logs/initial-ours-$r.log" \
        || die "the first ship was not an initial copy: $(cat "$W/logs/initial-ours-$r.log")"
    ship_s[$r]=$T_SEC ship_cpu[$r]=$T_CPU ship_rss[$r]=$T_RSS_KB
    # The last round's cache and state go on; the others are dropped once measured.
    if ((r < 3)); then
        rm -rf -- "$MEM/cache-$r" "$W/src-state-$r"
    fi
done
mv -- "$MEM/cache-3" "$CACHE"
mv -- "$W/src-state-3" "$W/src-state"
stored_initial=$(bytes_of "$CACHE")
kept_up=$(sed -n 's/^ *\([0-9]*\) of [0-9]* blobs stored uncompressed.*/\1/p' "$W/logs/initial-ours-3.log")
m=$(which_median "${ship_s[@]}")
sec_of[ours_ship]=${ship_s[$m]}
m=$(which_median "${dd_read_s[@]}")
sec_of[dd_read]=${dd_read_s[$m]}
row "initial copy" "dd read (O_DIRECT, 1 MiB)" "${sec_of[dd_read]}" "${dd_read_cpu[$m]}" "$size_bytes" "${dd_read_rss[$m]}" - \
    "reads the image once; median of ${dd_read_s[1]}, ${dd_read_s[2]}, ${dd_read_s[3]} s"
row "initial copy" "**ours: harness ship** (cycle 1)" "${sec_of[ours_ship]}" "${ship_cpu[$m]}" "$size_bytes" "${ship_rss[$m]}" "$stored_initial" \
    "zstd 1 (adaptive: ${kept_up:-0} blobs stored raw) + AES-256-GCM into a local cache on its own device (tmpfs); median of ${ship_s[1]}, ${ship_s[2]}, ${ship_s[3]} s"

# The hydrate rounds: rounds 1 and 2 from a copy of the cache (a hydrate writes its
# acknowledgement there) into a target removed once measured; round 3 is the real one.
for r in "${rounds[@]}"; do
    if ((r < 3)); then
        cache_r=$MEM/cache-copy tgt_r=$W/target-$r.img state_r=$W/tgt-state-$r
        rm -rf -- "$cache_r"
        cp -a -- "$CACHE" "$cache_r"
    else
        cache_r=$CACHE tgt_r=$TGT state_r=$W/tgt-state
    fi
    truncate -s "$size_bytes" "$tgt_r"
    timed "hydrate-ours-$r" "$HARNESS" hydrate --target "$tgt_r" --sink "$cache_r" --state "$state_r" --key-file "$KEY"
    hyd_s[$r]=$T_SEC hyd_cpu[$r]=$T_CPU hyd_rss[$r]=$T_RSS_KB
    if ((r < 3)); then
        rm -rf -- "$cache_r" "$tgt_r" "$state_r"
    fi
    timed "hydrate-dd-write-$r" dd if=/dev/zero of="$W/dd-out.img" oflag=direct bs=1M count="$mb"
    dd_write_s[$r]=$T_SEC dd_write_cpu[$r]=$T_CPU dd_write_rss[$r]=$T_RSS_KB
    rm -f -- "$W/dd-out.img"
done
m=$(which_median "${hyd_s[@]}")
sec_of[ours_hydrate]=${hyd_s[$m]}
row "hydrate" "**ours: harness hydrate**" "${sec_of[ours_hydrate]}" "${hyd_cpu[$m]}" "$size_bytes" "${hyd_rss[$m]}" - \
    "fetch, verify, decrypt, decompress, write; median of ${hyd_s[1]}, ${hyd_s[2]}, ${hyd_s[3]} s"
m=$(which_median "${dd_write_s[@]}")
sec_of[dd_write]=${dd_write_s[$m]}
row "hydrate" "dd write (O_DIRECT, 1 MiB)" "${sec_of[dd_write]}" "${dd_write_cpu[$m]}" "$size_bytes" "${dd_write_rss[$m]}" - \
    "writes the image size once; median of ${dd_write_s[1]}, ${dd_write_s[2]}, ${dd_write_s[3]} s"

# --- for context: the cache on the source's own disk ----------------------------------------------
timed initial-ours-same-disk "$HARNESS" ship --source "$IMG" --sink "$W/cache-disk" \
    --state "$W/src-state-disk" --key-file "$KEY"
sec_of[ours_ship_disk]=$T_SEC
row "initial copy" "ours: harness ship, cache on the source's disk" "$T_SEC" "$T_CPU" "$size_bytes" "$T_RSS_KB" "$(bytes_of "$W/cache-disk")" \
    "the cache's writes share the disk with the reads"
truncate -s "$size_bytes" "$W/target-disk.img"
timed hydrate-ours-same-disk "$HARNESS" hydrate --target "$W/target-disk.img" --sink "$W/cache-disk" \
    --state "$W/tgt-state-disk" --key-file "$KEY"
sec_of[ours_hydrate_disk]=$T_SEC
row "hydrate" "ours: harness hydrate, cache on the target's disk" "$T_SEC" "$T_CPU" "$size_bytes" "$T_RSS_KB" - \
    "reads the cache from the disk it writes"
rm -rf -- "$W/cache-disk" "$W/src-state-disk" "$W/target-disk.img" "$W/tgt-state-disk"

# --- initial copy, peers --------------------------------------------------------------------------
timed initial-zstd zstd -1 -T0 -q "$IMG" -o "$W/source.img.zst"
row "initial copy" "zstd -1 -T0" "$T_SEC" "$T_CPU" "$size_bytes" "$T_RSS_KB" "$(bytes_of "$W/source.img.zst")" "compression only"
rm -f "$W/source.img.zst"

timed initial-qcow2 qemu-img convert -O qcow2 "$IMG" "$W/source.qcow2"
row "initial copy" "qemu-img convert -O qcow2" "$T_SEC" "$T_CPU" "$size_bytes" "$T_RSS_KB" "$(bytes_of "$W/source.qcow2")" "skips zero clusters"
rm -f "$W/source.qcow2"

timed initial-qcow2-zstd qemu-img convert -c -O qcow2 -o compression_type=zstd "$IMG" "$W/source.qcow2"
row "initial copy" "qemu-img convert -c (zstd)" "$T_SEC" "$T_CPU" "$size_bytes" "$T_RSS_KB" "$(bytes_of "$W/source.qcow2")" "compressed qcow2"
rm -f "$W/source.qcow2"

# --- initial copy, continued: backups and a full copy -------------------------------------------
restic -r "$W/restic" init >"$W/logs/restic-init.log" 2>&1 \
    || { cat "$W/logs/restic-init.log" >&2; die "restic init failed"; }
timed initial-restic restic -r "$W/restic" backup "$IMG"
sec_of[restic_initial]=$T_SEC
restic_after_initial=$(bytes_of "$W/restic")
row "initial copy" "restic backup" "$T_SEC" "$T_CPU" "$size_bytes" "$T_RSS_KB" "$restic_after_initial" "$(restic version | cut -d' ' -f1-2), encrypted"

borg init --encryption=repokey-blake2 "$W/borg" >"$W/logs/borg-init.log" 2>&1 \
    || { cat "$W/logs/borg-init.log" >&2; die "borg init failed"; }
timed initial-borg borg create "$W/borg::initial" "$IMG"
borg_after_initial=$(bytes_of "$W/borg")
row "initial copy" "borg create" "$T_SEC" "$T_CPU" "$size_bytes" "$T_RSS_KB" "$borg_after_initial" "$(borg --version), repokey-blake2, lz4"

# This copy is also the pre-churn image the rsync delta updates.
mkdir -p "$W/rsync"
timed initial-rsync rsync --stats "$IMG" "$W/rsync/"
row "initial copy" "rsync (full copy)" "$T_SEC" "$T_CPU" "$size_bytes" "$T_RSS_KB" "$(bytes_of "$W/rsync")" "local whole-file copy"

# --- churn -------------------------------------------------------------------------------------
# The pre-churn copies are ready: the rsync copy, the restic and borg snapshots, our target.
timed churn-write "$HARNESS" write --source "$IMG" --state "$W/src-state" --pattern innodb \
    --bytes "$churn_bytes" --seed "$SEED"
row "churn" "ours: harness write --pattern innodb" "$T_SEC" "$T_CPU" "$churn_bytes" "$T_RSS_KB" - \
    "$((churn_bytes / page)) random 16 KiB pages through the tracker"

# --- delta -------------------------------------------------------------------------------------
cache_before=$(bytes_of "$CACHE")
timed delta-ours-ship "$HARNESS" ship --source "$IMG" --sink "$CACHE" --state "$W/src-state" --key-file "$KEY"
grep -q 'delta' "$W/logs/delta-ours-ship.log" || die "the second ship was not a delta: $(cat "$W/logs/delta-ours-ship.log")"
ship_sec=$T_SEC ship_rss=$T_RSS_KB ship_cpu=$T_CPU
ship_stored=$(($(bytes_of "$CACHE") - cache_before))
timed delta-ours-hydrate "$HARNESS" hydrate --target "$TGT" --sink "$CACHE" --state "$W/tgt-state" --key-file "$KEY"
hyd_sec=$T_SEC hyd_rss=$T_RSS_KB hyd_cpu=$T_CPU
sec_of[ours_delta]=$(awk -v a="$ship_sec" -v b="$hyd_sec" 'BEGIN { printf "%.3f", a + b }')
row "delta" "ours: harness ship" "$ship_sec" "$ship_cpu" "$churn_bytes" "$ship_rss" "$ship_stored" "reads the changed sectors only"
row "delta" "ours: harness hydrate" "$hyd_sec" "$hyd_cpu" "$churn_bytes" "$hyd_rss" - ""
row "delta" "**ours: ship + hydrate**" "${sec_of[ours_delta]}" "$(awk -v a="$ship_cpu" -v b="$hyd_cpu" 'BEGIN { printf "%.2f", a + b }')" "$churn_bytes" "$((ship_rss > hyd_rss ? ship_rss : hyd_rss))" "$ship_stored" "two processes, total wall time"

# --ignore-times: the copy was made moments before the churn, so size and mtime can match to the
# second and rsync's quick check would skip the file instead of computing the delta.
timed delta-rsync rsync --inplace --no-whole-file --ignore-times --stats "$IMG" "$W/rsync/"
sec_of[rsync_delta]=$T_SEC
literal=$(sed -n 's/^Literal data: \([0-9,]*\) bytes.*/\1/p' "$W/logs/delta-rsync.log" | tr -d ,)
[[ $literal =~ ^[0-9]+$ ]] || die "cannot read rsync's literal data from $W/logs/delta-rsync.log"
((literal > 0)) || die "rsync sent no literal data: the churn did not reach the image it read"
row "delta" "rsync --inplace --no-whole-file" "$T_SEC" "$T_CPU" "$churn_bytes" "$T_RSS_KB" - \
    "$(awk -v b="$literal" 'BEGIN { printf "%.1f MiB", b / 1048576 }') literal data sent; reads both images in full"

timed delta-restic restic -r "$W/restic" backup "$IMG"
sec_of[restic_delta]=$T_SEC
row "delta" "restic backup (incremental)" "$T_SEC" "$T_CPU" "$churn_bytes" "$T_RSS_KB" "$(($(bytes_of "$W/restic") - restic_after_initial))" "rereads the image in full"
rm -rf -- "$W/restic"

timed delta-borg borg create "$W/borg::delta" "$IMG"
row "delta" "borg create (incremental)" "$T_SEC" "$T_CPU" "$churn_bytes" "$T_RSS_KB" "$(($(bytes_of "$W/borg") - borg_after_initial))" "rereads the image in full"
rm -rf -- "$W/borg"

fio_common=(--bs=16k --iodepth=32 --ioengine=libaio --direct=1 --size="$size_bytes"
    --io_size="$churn_bytes" --randrepeat=0 --group_reporting)
# fio's own I/O time (its `run=` figure, in ms) is the floor: the wall time adds fio's start
# (laying out jobs, threads), which is not part of reading or writing the blocks.
fio_io_sec() {
    local ms
    ms=$(sed -n 's/.*run=\([0-9]*\)-\([0-9]*\)msec.*/\2/p' "$W/logs/$1.log" | head -n 1)
    [[ $ms =~ ^[0-9]+$ ]] || die "cannot read fio's run time from $COMPARE_DIR/logs/$1.log"
    awk -v ms="$ms" 'BEGIN { printf "%.3f", ms / 1000 }'
}
timed delta-fio-read fio --name=read --filename="$IMG" --rw=randread "${fio_common[@]}"
fio_read_sec=$(fio_io_sec delta-fio-read) fio_read_rss=$T_RSS_KB fio_read_cpu=$T_CPU
row "delta" "fio randread 16 KiB QD32" "$fio_read_sec" "$T_CPU" "$churn_bytes" "$T_RSS_KB" - "reads as many random blocks; fio's I/O time ($T_SEC s wall)"
# Written as our hydrate writes: into an image allocated like our target (a sparse copy of the
# source: the zero segments are holes, so some blocks are allocated by the writes) and made
# durable at the end (our hydrate syncs the target before it acknowledges).
cp --sparse=always -- "$IMG" "$W/fio-target.img"
timed delta-fio-write fio --name=write --filename="$W/fio-target.img" --rw=randwrite --end_fsync=1 "${fio_common[@]}"
fio_write_sec=$(fio_io_sec delta-fio-write)
row "delta" "fio randwrite 16 KiB QD32" "$fio_write_sec" "$T_CPU" "$churn_bytes" "$T_RSS_KB" - "writes as many random blocks into a sparse image like the target, then fsync; fio's I/O time ($T_SEC s wall)"
rm -f -- "$W/fio-target.img"
sec_of[fio]=$(awk -v a="$fio_read_sec" -v b="$fio_write_sec" 'BEGIN { printf "%.3f", a + b }')
row "delta" "fio read + write" "${sec_of[fio]}" "$(awk -v a="$fio_read_cpu" -v b="$T_CPU" 'BEGIN { printf "%.2f", a + b }')" "$churn_bytes" "$((fio_read_rss > T_RSS_KB ? fio_read_rss : T_RSS_KB))" - "the floor: just the changed blocks"

# --- verify ------------------------------------------------------------------------------------
say "verify: our target against the churned source"
"$HARNESS" verify --source "$IMG" --target "$TGT" >"$W/logs/verify.log" 2>&1 \
    || { cat "$W/logs/verify.log" >&2; die "harness verify: the target differs from the source"; }
qemu_rc=0
qemu-img compare -q -f raw -F raw "$IMG" "$TGT" >"$W/logs/qemu-compare.log" 2>&1 || qemu_rc=$?
((qemu_rc == 0)) || { cat "$W/logs/qemu-compare.log" >&2; die "qemu-img compare: the target differs from the source (exit $qemu_rc)"; }

# --- the table ---------------------------------------------------------------------------------
# ratio NAME GOAL(>=|<=) THRESHOLD NUMERATOR DENOMINATOR
ratio_rows=()
ratio() {
    local name=$1 op=$2 goal=$3 num=$4 den=$5 value met
    value=$(awk -v n="$num" -v d="$den" 'BEGIN { if (d > 0) printf "%.2f", n / d; else print "inf" }')
    met=$(awk -v v="$value" -v g="$goal" -v op="$op" 'BEGIN {
        if (v == "inf") ok = (op == ">=") ; else ok = (op == ">=") ? (v + 0 >= g) : (v + 0 <= g)
        print ok ? "met" : "**NOT met**" }')
    ratio_rows+=("| $name | $op $goal | $value | $met |")
}
# context NAME NUMERATOR DENOMINATOR: a ratio shown without a goal.
context() {
    local value
    value=$(awk -v n="$2" -v d="$3" 'BEGIN { if (d > 0) printf "%.2f", n / d; else print "inf" }')
    ratio_rows+=("| $1 | (context) | $value | |")
}
ratio "ours / dd read (initial copy throughput)" ">=" 0.8 "${sec_of[dd_read]}" "${sec_of[ours_ship]}"
ratio "ours hydrate / dd write (throughput)" ">=" 0.8 "${sec_of[dd_write]}" "${sec_of[ours_hydrate]}"
context "ours / dd read, cache on the source's disk" "${sec_of[dd_read]}" "${sec_of[ours_ship_disk]}"
context "ours hydrate / dd write, cache on the target's disk" "${sec_of[dd_write]}" "${sec_of[ours_hydrate_disk]}"
ratio "rsync / ours (delta time)" ">=" 15 "${sec_of[rsync_delta]}" "${sec_of[ours_delta]}"
ratio "restic / ours (delta time)" ">=" 10 "${sec_of[restic_delta]}" "${sec_of[ours_delta]}"
ratio "ours / fio read + write (delta time)" "<=" 3 "${sec_of[ours_delta]}" "${sec_of[fio]}"

{
    echo "Image: $SIZE ($size_bytes bytes, seed $SEED) from \`harness image\`;" \
        "churn: $churn_bytes bytes (1 %) in random 16 KiB pages."
    echo "Measured $(date -u '+%Y-%m-%d %H:%M UTC') on $(nproc) cores" \
        "($(lscpu | sed -n 's/^Model name: *//p' | head -n 1)), $(. /etc/os-release && echo "$PRETTY_NAME")," \
        "kernel $(uname -r), file system $fs_type; commit $commit."
    echo "Seconds are wall time (fio: its own I/O time); CPU s is user + system time of all the" \
        "tool's threads and processes (fio: the whole process); MB/s is the step's data (the image for the" \
        "initial copy and hydrate, the churn for the delta) per second. The page cache is dropped" \
        "before every step (then the tool's program is loaded once); stored is what the tool's" \
        "store grew by."
    echo
    echo "| step | tool | seconds | CPU s | MB/s | peak RSS | stored | notes |"
    echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"
    printf '%s\n' "${rows[@]}" | sort -s -n -k1,1 | cut -f2-
    echo
    echo "| ratio | goal | measured | |"
    echo "| --- | --- | ---: | --- |"
    printf '%s\n' "${ratio_rows[@]}"
    echo
    echo "Target verified identical to the churned source (harness verify, qemu-img compare)."
} >"$table_file"
cat "$table_file"
say "table written to $table_file"
