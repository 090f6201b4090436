#!/usr/bin/env bash
# test/bench.sh [options] — the standard benchmark matrix of vhost-device-scsi,
# driven by vhost-scsi-bench (a real vhost-user frontend) and compared with
# the host's own pread/pwrite on the same image. Writes a Markdown table to
# stdout and to test/out/bench.md; each run's JSON stays in test/out/bench/.
#
#   --runtime SECS   seconds per run (default 3)
#   --rounds R       runs per side, alternating (default 1)
#   --image PATH     image to use, created with --size if missing
#                    (default test/out/bench.img)
#   --size SIZE      size of a new image (default 1G)
#   --compare PATH   a second daemon binary: adds its IOPS and B/A columns
#   --no-build       use the release binaries as they are
#
# Matrix: 4k randread QD1 and QD32, 4k randwrite QD32, 1M sequential read
# QD8, each on 1 and 2 request queues (one submitting thread per queue; the
# daemon gets --threads=N when it has that flag), page cache; the O_DIRECT
# rows are marked "not supported yet" unless the daemon has --direct. When
# the daemon has --io-engine, a second table compares its engines on the
# same binary with O_DIRECT: 4k randread and randwrite QD32 on one queue,
# A = --io-engine=sync, B = --io-engine=io-uring (rounds alternate A, B).
# Keep runs short on small machines: each row costs 2 x runtime per round.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$ROOT/test/out
RUNTIME=3
ROUNDS=1
IMAGE=$OUT/bench.img
SIZE=1G
COMPARE=
BUILD=1

while (($#)); do
    case $1 in
    --runtime) RUNTIME=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --image) IMAGE=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --compare) COMPARE=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

command -v python3 >/dev/null || { echo "bench.sh: python3 is needed to build the table" >&2; exit 1; }

cd "$ROOT"
if ((BUILD)); then
    cargo build --release --quiet
fi
BENCH=$ROOT/target/release/vhost-scsi-bench
DAEMON=$ROOT/target/release/vhost-device-scsi
mkdir -p "$OUT/bench"
rm -f "$OUT"/bench/*.json

has_flag() { grep -qE -- "(^|[ ,])$2([ =,]|$)" <<<"$("$1" --help)"; }
DIRECT=0
has_flag "$DAEMON" --direct && { [[ -z $COMPARE ]] || has_flag "$COMPARE" --direct; } && DIRECT=1
THREADS=0
has_flag "$DAEMON" --threads && THREADS=1
ENGINES=0
((DIRECT)) && has_flag "$DAEMON" --io-engine && ENGINES=1

# name rw bs iodepth
MATRIX=(
    "4k-randread-qd1 randread 4k 1"
    "4k-randread-qd32 randread 4k 32"
    "4k-randwrite-qd32 randwrite 4k 32"
    "1m-read-qd8 read 1M 8"
)

run() { # name queues cache rw bs iodepth
    local name=$1 queues=$2 cache=$3 rw=$4 bs=$5 qd=$6
    local args=(--daemon "$DAEMON" --image "$IMAGE" --size "$SIZE" --rw "$rw" --bs "$bs"
        --iodepth "$qd" --queues "$queues" --runtime "$RUNTIME" --rounds "$ROUNDS"
        --warmup 0.5 --json)
    [[ $cache == direct ]] && args+=(--direct)
    if [[ -n $COMPARE ]]; then
        args+=(--compare "$COMPARE")
        # B may predate --threads: then only A gets it.
        if ((THREADS)) && has_flag "$COMPARE" --threads; then
            args+=(--daemon-arg "--threads=$queues")
        elif ((THREADS)); then
            args+=(--a-arg "--threads=$queues")
        fi
    elif ((THREADS)); then
        args+=(--daemon-arg "--threads=$queues")
    fi
    echo "bench.sh: $name, $queues queue(s), $cache" >&2
    "$BENCH" "${args[@]}" >"$OUT/bench/$name-q$queues-$cache.json"
}

for cache in cached direct; do
    for queues in 1 2; do
        for row in "${MATRIX[@]}"; do
            read -r name rw bs qd <<<"$row"
            if [[ $cache == direct ]] && ((!DIRECT)); then
                echo "{\"unsupported\": \"$name\"}" >"$OUT/bench/$name-q$queues-$cache.json"
                continue
            fi
            run "$name" "$queues" "$cache" "$rw" "$bs" "$qd"
        done
    done
done

# The I/O engines against each other: same binary, O_DIRECT, one queue.
ENGINE_MATRIX=(
    "4k-randread-qd32 randread 4k 32"
    "4k-randwrite-qd32 randwrite 4k 32"
)
if ((ENGINES)); then
    for row in "${ENGINE_MATRIX[@]}"; do
        read -r name rw bs qd <<<"$row"
        echo "bench.sh: $name, sync vs io-uring engine, O_DIRECT" >&2
        "$BENCH" --daemon "$DAEMON" --compare "$DAEMON" --image "$IMAGE" --size "$SIZE" \
            --rw "$rw" --bs "$bs" --iodepth "$qd" --queues 1 --runtime "$RUNTIME" \
            --rounds "$ROUNDS" --warmup 0.5 --direct --json \
            --a-arg=--io-engine=sync --b-arg=--io-engine=io-uring \
            >"$OUT/bench/engines-$name.json"
    done
fi

python3 - "$OUT/bench" "$RUNTIME" "$ROUNDS" "$DIRECT" "$THREADS" "$COMPARE" "$ENGINES" <<'EOF' | tee "$OUT/bench.md"
import json, os, platform, sys

folder, runtime, rounds, direct, threads, compare, engines = sys.argv[1:8]
cpu = "unknown"
with open("/proc/cpuinfo") as f:
    for line in f:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
print(f"Machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu}, "
      f"Linux {platform.release()}. {runtime} s per run, {rounds} round(s), 0.5 s warm-up; "
      "host = pread/pwrite on the same image from one thread per queue, one I/O at a time.")
print()
cols = ["workload", "queues", "cache", "IOPS", "MB/s", "p50 µs", "p99 µs", "p99.9 µs",
        "daemon CPU s/MIO", "host IOPS", "host p50 µs", "daemon/host IOPS", "added p50 µs"]
if compare:
    cols += ["B IOPS", "B/A IOPS"]
print("| " + " | ".join(cols) + " |")
print("|" + "|".join(["---"] * 3 + ["---:"] * (len(cols) - 3)) + "|")
order = ["4k-randread-qd1", "4k-randread-qd32", "4k-randwrite-qd32", "1m-read-qd8"]
labels = {"4k-randread-qd1": "4k randread QD1", "4k-randread-qd32": "4k randread QD32",
          "4k-randwrite-qd32": "4k randwrite QD32", "1m-read-qd8": "1M read QD8"}
for cache in ["cached", "direct"]:
    for queues in [1, 2]:
        for name in order:
            with open(f"{folder}/{name}-q{queues}-{cache}.json") as f:
                r = json.load(f)
            cache_label = "page cache" if cache == "cached" else "O_DIRECT"
            row = [labels[name], str(queues), cache_label]
            if "unsupported" in r:
                row += ["not supported yet (the daemon has no --direct)"] + [""] * (len(cols) - 4)
                print("| " + " | ".join(row) + " |")
                continue
            a, h = r["a"], r["host"]
            fmt = lambda v, d=1: "-" if v is None else f"{v:,.{d}f}"
            row += [fmt(a["iops"], 0), fmt(a["mb_s"]), fmt(a["lat_us"]["p50"]),
                    fmt(a["lat_us"]["p99"]), fmt(a["lat_us"]["p99_9"]),
                    fmt(a["cpu_s_per_mio"], 2), fmt(h["iops"], 0), fmt(h["lat_us"]["p50"]),
                    fmt(r["ratios"]["a_over_host"]["iops"], 2),
                    fmt(r["ratios"]["a_over_host"]["p50_added_us"])]
            if compare:
                row += [fmt(r["b"]["iops"], 0), fmt(r["ratios"]["b_over_a"]["iops"], 2)]
            print("| " + " | ".join(row) + " |")
print()
print("Daemon: " + ("--threads=N for N queues" if threads == "1" else "default threads")
      + "; " + ("--direct supported" if direct == "1" else "no --direct flag yet") + "; "
      + ("default --io-engine (auto)" if engines == "1" else "one I/O engine") + ".")
if engines == "1":
    print()
    print("I/O engines, O_DIRECT, 1 queue, same binary: A = --io-engine=sync, "
          "B = --io-engine=io-uring; host = pread/pwrite, one I/O at a time.")
    print()
    ecols = ["workload", "sync IOPS", "sync p50 µs", "io-uring IOPS", "io-uring p50 µs",
             "io-uring/sync IOPS", "sync IOPS per round", "io-uring IOPS per round", "host IOPS"]
    print("| " + " | ".join(ecols) + " |")
    print("|---|" + "|".join(["---:"] * (len(ecols) - 1)) + "|")
    elabels = {"4k-randread-qd32": "4k randread QD32", "4k-randwrite-qd32": "4k randwrite QD32"}
    fmt = lambda v, d=1: "-" if v is None else f"{v:,.{d}f}"
    for name in ["4k-randread-qd32", "4k-randwrite-qd32"]:
        with open(f"{folder}/engines-{name}.json") as f:
            r = json.load(f)
        a, b, h = r["a"], r["b"], r["host"]
        per_round = lambda side: ", ".join(f"{x:,.0f}" for x in side.get("round_iops", []))
        print("| " + " | ".join([elabels[name], fmt(a["iops"], 0), fmt(a["lat_us"]["p50"]),
                                 fmt(b["iops"], 0), fmt(b["lat_us"]["p50"]),
                                 fmt(r["ratios"]["b_over_a"]["iops"], 2),
                                 per_round(a), per_round(b), fmt(h["iops"], 0)]) + " |")
EOF
