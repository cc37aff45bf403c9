#!/usr/bin/env bash
# Kill -9 torture with real processes, as root.
#
# A source loop device (--direct-io=on) followed by `harness track` (the kernel tracker, kept
# running throughout), written continuously by fio at a modest rate, while `harness ship
# --tracker kernel` and `harness hydrate` run in loops as separate processes, each killed with
# SIGKILL at random instants and started again, until TORTURE_KILLS kills were made. Then the
# workload stops and ship/hydrate run undisturbed until the target image is byte-identical to the
# device (`harness verify` and `cmp`); `harness gc` runs, and the cache must then hold no orphan
# (`gc --dry-run` plans nothing, every blob belongs to a manifest of its attempt, no temporary file
# is left). Every object put into the cache is recorded (`--record-puts`), and no (key id, disk,
# cycle, attempt, salt, kind, seq), i.e. no AES-GCM key and nonce, may appear with two different
# tags. Exits non-zero with a message on any violation.
#
#   benches/torture.sh                  the full run (TORTURE_KILLS=200)
#   benches/torture.sh check RECORD     only the nonce check of a put record
#   benches/torture.sh selftest         the nonce check must catch a crafted reuse (no root)
#
# Environment:
#   TORTURE_KILLS=200        SIGKILLs to deliver in total, to ship and hydrate together
#   TORTURE_SEED=<random>    seeds the kill schedule (which side, when); printed at the start
#   TORTURE_SIZE=64M         the source device's size
#   TORTURE_MAX_DELAY_MS=250  a process is killed at a uniform instant in 5..this ms of its life
#                            (doubled after each kill of a side that has not completed since)
#   TORTURE_IOPS=200         fio's 4 KiB random writes per second during the torture
#   TORTURE_CORRUPT_RECORD=1 duplicate a recorded put with a changed tag before the check: the run
#                            must then fail (shows that the check can fail)
#   TORTURE_KEEP=1           keep the work directory (always kept on failure)
#   HARNESS=path             the harness binary (default target/debug/harness, built first)
set -euo pipefail
cd "$(dirname "$0")/.."

die() { printf 'torture: FAILED: %s\n' "$*" >&2; exit 1; }
say() { printf 'torture: %s\n' "$*"; }

# The nonce check: reads a put record (see harness/src/sinks.rs, RecordPutsSink) and fails if one
# (kind, key id, disk, cycle, attempt, seq, salt) carries two different tags, or if a line is
# malformed or names an object without a readable header. Prints "nonces N puts P".
check_record() {
    local record=$1
    [[ -f "$record" ]] || die "no put record at $record"
    awk '
        NF == 0 { next }
        $1 == "unparsed" { printf "object put without a readable header (line %d): %s\n", NR, $0; bad++; next }
        ($1 != "begin" && $1 != "done") || NF != 10 || length($10) != 32 {
            printf "malformed record line %d: %s\n", NR, $0; bad++; next
        }
        {
            t = $3 " " $4 " " $5 " " $6 " " $7 " " $8 " " $9
            if (t in tag) {
                if (tag[t] != $10) {
                    printf "NONCE REUSE: kind %s, key id %s, disk %s, cycle %s, attempt %s, seq %s, salt %s: tag %s (%s, line %d) and tag %s (%s, line %d)\n", \
                        $3, $4, $5, $6, $7, $8, $9, tag[t], key[t], line[t], $10, $2, NR
                    bad++
                }
            } else {
                tag[t] = $10; key[t] = $2; line[t] = NR; nonces++
            }
            if ($1 == "done") puts++
        }
        END {
            printf "nonces %d puts %d\n", nonces, puts
            exit (bad > 0 ? 1 : 0)
        }
    ' "$record"
}

selftest() {
    local dir rec out
    dir=$(mktemp -d)
    rec=$dir/record
    local k=0123456789abcdef d=000102030405060708090a0b0c0d0e0f s=ffeeddccbbaa99887766554433221100
    local t1=11111111111111111111111111111111 t2=22222222222222222222222222222222
    {
        echo "begin disks/$d/blobs/1/1/0 blob $k $d 1 1 0 $s $t1"
        echo "done disks/$d/blobs/1/1/0 blob $k $d 1 1 0 $s $t1"
        # The same contents put again: the same ciphertext, harmless.
        echo "done disks/$d/blobs/1/1/0 blob $k $d 1 1 0 $s $t1"
        # Another seq, another attempt, another salt, another kind: other nonces or keys.
        echo "done disks/$d/blobs/1/1/1 blob $k $d 1 1 1 $s $t2"
        echo "done disks/$d/blobs/1/2/0 blob $k $d 1 2 0 $s $t2"
        echo "done disks/$d/blobs/1/1/0 blob $k $d 1 1 0 ${s/ff/00} $t2"
        echo "done disks/$d/manifests/1 manifest $k $d 1 1 0 $s $t2"
    } >"$rec"
    out=$(check_record "$rec") || { rm -rf "$dir"; die "selftest: a record without reuse was rejected: $out"; }
    [[ "$out" == "nonces 5 puts 6" ]] || { rm -rf "$dir"; die "selftest: unexpected figures: $out"; }
    echo "done disks/$d/blobs/1/1/0 blob $k $d 1 1 0 $s $t2" >>"$rec"
    if out=$(check_record "$rec"); then
        rm -rf "$dir"; die "selftest: a nonce reuse went unnoticed: $out"
    fi
    grep -q "NONCE REUSE: kind blob, key id $k, disk $d, cycle 1, attempt 1, seq 0" <<<"$out" \
        || { rm -rf "$dir"; die "selftest: the reuse was not named: $out"; }
    printf 'unparsed disks/x bad magic\n' >"$rec"
    if check_record "$rec" >/dev/null; then rm -rf "$dir"; die "selftest: an unparsed object went unnoticed"; fi
    printf 'done a b\n' >"$rec"
    if check_record "$rec" >/dev/null; then rm -rf "$dir"; die "selftest: a malformed line went unnoticed"; fi
    rm -rf "$dir"
    say "selftest passed: the nonce check catches a reuse, an unreadable object and a malformed line"
}

case "${1:-}" in
    check) [[ $# -eq 2 ]] || die "usage: benches/torture.sh check RECORD"; check_record "$2"; exit ;;
    selftest) selftest; exit ;;
    "") ;;
    *) die "usage: benches/torture.sh [check RECORD | selftest]" ;;
esac

kills_total=${TORTURE_KILLS:-200}
seed=${TORTURE_SEED:-$(( $(od -An -N2 -tu2 /dev/urandom) ))}
size=${TORTURE_SIZE:-64M}
max_delay=${TORTURE_MAX_DELAY_MS:-250}
iops=${TORTURE_IOPS:-200}
harness=${HARNESS:-target/debug/harness}

[[ $(id -u) -eq 0 ]] || die "it attaches a loop device and runs the kernel tracker: run it as root"
for tool in fio losetup cmp od awk; do
    command -v "$tool" >/dev/null || die "$tool is missing (scripts/test.sh installs fio and the rest)"
done
(( max_delay > 5 )) || die "TORTURE_MAX_DELAY_MS must be over 5"
if [[ -z "${HARNESS:-}" ]]; then
    # The default binary is built (or found up to date) so a stale one is never tortured.
    say "building the harness"
    cargo build -q -p harness --locked
fi
harness=$(realpath "$harness")

work=$(mktemp -d /var/tmp/replicator-torture.XXXXXX)
loopdev="" tracker_pid="" fio_pid="" ship_pid="" hydrate_pid="" ok=0
# Stops a child: SIGNAL, then SIGKILL if it is still there after 5 s. It polls /proc instead of
# `wait`, which can block for good inside this EXIT trap (seen after a failure in the main loop,
# waiting on a ship already killed and gone).
stop_child() {
    local pid=$1 signal=$2 i st
    [[ -n "$pid" ]] || return 0
    kill "-$signal" "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        [[ -d /proc/$pid ]] || return 0
        read -r _ _ st _ 2>/dev/null </proc/"$pid"/stat || return 0
        [[ $st == Z ]] && return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}
cleanup() {
    set +e
    stop_child "$ship_pid" KILL
    stop_child "$hydrate_pid" KILL
    stop_child "$fio_pid" TERM
    stop_child "$tracker_pid" TERM
    if [[ -n "$loopdev" ]]; then losetup -d "$loopdev" || echo "torture: could not detach $loopdev" >&2; fi
    if ((ok)) && [[ -z "${TORTURE_KEEP:-}" ]]; then
        rm -rf "$work"
    else
        echo "torture: the work directory (logs, put record, cache) is kept in $work" >&2
    fi
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

truncate -s "$size" "$work/src.img" "$work/tgt.img"
loopdev=$(losetup --find --show --direct-io=on "$work/src.img")
"$harness" keygen --out "$work/key" >/dev/null
mkdir -p "$work/cache"
record=$work/puts.record
sink=(--sink "$work/cache" --record-puts "$record")
ship_cmd=("$harness" ship --source "$loopdev" "${sink[@]}" --state "$work/src-state"
    --key-file "$work/key" --tracker kernel --tracker-state "$work/ktrack")
hydrate_cmd=("$harness" hydrate --target "$work/tgt.img" "${sink[@]}" --state "$work/tgt-state"
    --key-file "$work/key")

"$harness" track --device "$loopdev" --state "$work/ktrack" >"$work/track.log" 2>&1 &
tracker_pid=$!
for _ in $(seq 300); do
    grep -q ready "$work/track.log" && break
    kill -0 "$tracker_pid" 2>/dev/null || die "the tracker exited: $(cat "$work/track.log")"
    sleep 0.1
done
grep -q ready "$work/track.log" || die "the tracker did not get ready: $(cat "$work/track.log")"

fio --name=torture --filename="$loopdev" --rw=randwrite --bs=4k --direct=1 --ioengine=psync \
    --rate_iops="$iops" --norandommap --randseed="$seed" --time_based --runtime=86400 \
    --output-format=terse >"$work/fio.log" 2>&1 &
fio_pid=$!

say "seed $seed (TORTURE_SEED=$seed repeats the kill schedule), $kills_total kills, source $loopdev ($size), fio at $iops x 4 KiB writes/s, work dir $work"
RANDOM=$seed
# The time in ms into $now, and short pauses, without forking.
tick() { local t=${EPOCHREALTIME/./}; now=$(( t / 1000 )); }
mkfifo "$work/pause"
exec 9<>"$work/pause"
pause() { read -r -t "$1" -u 9 _ || true; }
tick
started_ms=$now

declare -A pid deadline kills runs exits
declare -A streak # kills since the side's last completed run
for side in ship hydrate; do pid[$side]=""; kills[$side]=0; runs[$side]=0; streak[$side]=0; done
start_side() {
    local side=$1 n
    n=$(( ++runs[$side] ))
    echo "=== run $n" >>"$work/$side.log"
    if [[ $side == ship ]]; then
        "${ship_cmd[@]}" >>"$work/$side.log" 2>&1 &
        ship_pid=$!
    else
        "${hydrate_cmd[@]}" >>"$work/$side.log" 2>&1 &
        hydrate_pid=$!
    fi
    pid[$side]=$!
    # A side killed again and again before it could finish (a long initial copy) gets twice
    # the time after each such kill, up to 32 times: the run must make progress.
    local range=$(( (max_delay << (streak[$side] < 5 ? streak[$side] : 5)) - 5 ))
    tick
    deadline[$side]=$(( now + 5 + (RANDOM * 32768 + RANDOM) % range ))
}
# Whether a child has exited (or is a zombie), read from /proc without forking.
exited() {
    local st
    [[ -r /proc/$1/stat ]] || return 0
    read -r _ _ st _ 2>/dev/null </proc/"$1"/stat || return 0
    [[ $st == Z ]]
}
side_done() {
    local side=$1 code=$2
    pid[$side]=""
    if [[ $side == ship ]]; then ship_pid=""; else hydrate_pid=""; fi
    exits[$side:$code]=$(( ${exits[$side:$code]:-0} + 1 ))
    streak[$side]=0
    if (( code != 0 )); then
        echo "=== exit $code" >>"$work/$side.log"
        # The only failure allowed: hydrate before the first ship put anything.
        local last
        last=$(tail -n 4 "$work/$side.log")
        if [[ $side == hydrate && $code == 2 && $last == *"holds no disk yet"* ]]; then
            return 0
        fi
        die "$side exited $code on its own (see $work/$side.log):
$last"
    fi
}

while (( kills[ship] + kills[hydrate] < kills_total )); do
    tick
    for side in ship hydrate; do
        p=${pid[$side]}
        if [[ -z "$p" ]]; then
            start_side "$side"
        elif exited "$p"; then
            code=0; wait "$p" || code=$?
            side_done "$side" "$code"
        elif (( now >= deadline[$side] )); then
            kill -9 "$p" 2>/dev/null || true
            code=0; wait "$p" 2>/dev/null || code=$?
            if (( code == 137 )); then
                kills[$side]=$(( kills[$side] + 1 ))
                streak[$side]=$(( streak[$side] + 1 ))
                echo "=== killed" >>"$work/$side.log"
                pid[$side]=""
                if [[ $side == ship ]]; then ship_pid=""; else hydrate_pid=""; fi
            else
                side_done "$side" "$code" # it finished just before the kill
            fi
        fi
    done
    pause 0.01
done
tick
torture_ms=$(( now - started_ms ))
for side in ship hydrate; do
    p=${pid[$side]}
    if [[ -n "$p" ]]; then
        kill -9 "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
        pid[$side]=""
    fi
done
ship_pid="" hydrate_pid=""
say "killed ship ${kills[ship]} and hydrate ${kills[hydrate]} times in $(( torture_ms / 1000 )) s; stopping the workload"
kill -TERM "$fio_pid"
wait "$fio_pid" || true
fio_pid=""
sync

# The final sync, undisturbed: ship (answering a resync request if one is owed), hydrate, verify.
final_log=$work/final.log
identical=0
for round in 1 2 3 4 5 6; do
    echo "=== final round $round" >>"$final_log"
    "${ship_cmd[@]}" >>"$final_log" 2>&1 || die "ship failed in the final sync (see $final_log)"
    "${hydrate_cmd[@]}" >>"$final_log" 2>&1 || die "hydrate failed in the final sync (see $final_log)"
    if "$harness" verify --source "$loopdev" --target "$work/tgt.img" >>"$final_log" 2>&1; then
        identical=1
        break
    fi
done
((identical)) || die "the target is not identical to the source after 6 undisturbed rounds (see $final_log)"
cmp "$loopdev" "$work/tgt.img" || die "harness verify said identical, cmp disagrees"
say "final sync: identical after $round round(s) (harness verify and cmp)"

# The cache after gc: nothing left to collect, no blob outside a manifest of its attempt, no
# temporary file of a killed put.
"$harness" gc "${sink[@]}" --state "$work/src-state" >>"$final_log" 2>&1 || die "gc failed (see $final_log)"
plan=$("$harness" gc "${sink[@]}" --state "$work/src-state" --dry-run 2>&1) || die "gc --dry-run failed: $plan"
grep -q '^dry run: 0 objects' <<<"$plan" || die "gc left objects to collect: $plan"
orphans=0 blobs=0
while IFS= read -r blob; do
    blobs=$(( blobs + 1 ))
    rel=${blob#"$work/cache/"}                      # disks/<disk>/blobs/<cycle>/<attempt>/<seq>
    IFS=/ read -r _ disk _ cycle attempt _ <<<"$rel"
    manifest=$work/cache/disks/$disk/manifests/$cycle
    if [[ ! -f "$manifest" ]]; then
        echo "orphan: $rel has no manifest" >&2; orphans=$(( orphans + 1 ))
    elif (( $(od -An -tu8 -j44 -N8 "$manifest") != 10#$attempt )); then
        echo "orphan: $rel is not of the attempt its manifest names" >&2; orphans=$(( orphans + 1 ))
    fi
done < <(find "$work/cache/disks" -path '*/blobs/*' -type f)
(( orphans == 0 )) || die "$orphans orphaned blobs in the cache after gc"
manifests=$(find "$work/cache/disks" -path '*/manifests/*' -type f | wc -l)
say "cache after gc: $manifests manifests, $blobs blobs, no orphan"
# Not objects, so not orphans, but space: a put killed before its rename leaves its temporary
# file, named after its process; the next process that opens the cache removes those of dead
# processes, so after the final sync and gc none may be left.
tmp_files=$(find "$work/cache/.tmp" -type f 2>/dev/null | wc -l)
tmp_bytes=$(find "$work/cache/.tmp" -type f -printf '%s\n' 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
(( tmp_files == 0 )) || die "$tmp_files temporary files ($tmp_bytes bytes) of killed puts were left in the cache"

if [[ -n "${TORTURE_CORRUPT_RECORD:-}" ]]; then
    line=$(grep -m1 '^done ' "$record")
    tag=${line##* }
    flipped=$(( (16#${tag: -1} + 1) % 16 ))
    printf '%s%x\n' "${line% *} ${tag%?}" "$flipped" >>"$record"
    say "TORTURE_CORRUPT_RECORD: added a recorded put with a changed tag; the check must fail"
fi
nonce_out=$(check_record "$record") || {
    printf '%s\n' "$nonce_out" >&2
    die "nonce reuse in the put record $record"
}
read -r _ nonces _ puts <<<"$nonce_out"
tick
duration=$(( (now - started_ms) / 1000 ))

shipped=$(awk '$1 == "done" && $3 == "manifest" { print $2 }' "$record" | sort -u | wc -l)
committed=$("$harness" status --state "$work/tgt-state" | awk '/committed cycle/ { print $3 }')
resyncs=$(cat "$work/ship.log" "$final_log" | grep -c 'no cycle shipped' || true)
failed=$(cat "$work/hydrate.log" "$final_log" | grep -c ' FAILED' || true)
say "figures (seed $seed):"
printf '  kills           ship %d, hydrate %d (total %d)\n' "${kills[ship]}" "${kills[hydrate]}" "$(( kills[ship] + kills[hydrate] ))"
printf '  runs            ship %d (%d completed), hydrate %d (%d completed, %d before any disk)\n' \
    "${runs[ship]}" "${exits[ship:0]:-0}" "${runs[hydrate]}" "${exits[hydrate:0]:-0}" "${exits[hydrate:2]:-0}"
printf '  cycles          %s shipped and applied in order (%d manifest puts seen completing), %d resync requests, %d failed cycles\n' \
    "$committed" "$shipped" "$resyncs" "$failed"
printf '  objects         %d puts recorded, %d distinct nonces checked: no reuse\n' "$puts" "$nonces"
printf '  final sync      identical after %d round(s); gc left no orphan\n' "$round"
printf '  leftovers       %d temporary files of killed puts in the cache directory (%d bytes)\n' "$tmp_files" "$tmp_bytes"
printf '  duration        %d s (torture %d s)\n' "$duration" "$(( torture_ms / 1000 ))"
ok=1
say "passed"
