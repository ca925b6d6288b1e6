#!/usr/bin/env bash
# gpupool beside the queues a team would pick instead, on the same brokers,
# and rewrites the peers table in BENCHMARKS.md:
#   apalis 0.7 on Redis and on MySQL/MariaDB, Celery 5 on RabbitMQ and on Redis.
#
#   scripts/bench-peers.sh [--jobs N] [--rounds R] [--quick]
#
# Each round runs every contender once, one after another on each broker
# (gpupool, then its peers), so a slow stretch of this shared machine falls on
# all of them; the table reports the median of the rounds (default 3).
# The peers live outside the main workspace: apalis in its own Cargo
# workspace (benches/peers), Celery in a venv this script makes
# (benches/peers/.venv). Neither slows `cargo build` of gpupool.
# URLs: GPUPOOL_TEST_MYSQL_URL, GPUPOOL_TEST_REDIS_URL, GPUPOOL_TEST_AMQP_URL
# (defaults: the loopback services of this project's machines). apalis keeps
# its unprefixed tables in a database of its own, PEERS_MYSQL_URL (default:
# the MySQL URL with the database gpupool_peers, which it creates: the user
# needs CREATE on it). Needs python3 with venv (Debian: python3-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
MYSQL=${GPUPOOL_TEST_MYSQL_URL:-mysql://gpupool:gpupool@127.0.0.1:3306/gpupool_test}
REDIS=${GPUPOOL_TEST_REDIS_URL:-redis://127.0.0.1:6379}
AMQP=${GPUPOOL_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
JOBS=2000
ROUNDS=3
ARGS="$*"
while [ $# -gt 0 ]; do
  case "$1" in
    --jobs) JOBS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --quick) JOBS=500; ROUNDS=1; shift ;;
    *) echo "usage: scripts/bench-peers.sh [--jobs N] [--rounds R] [--quick]" >&2; exit 2 ;;
  esac
done
C=8

cargo build --release -q -p gpupool-benches --bin loadgen
cargo build --release -q --manifest-path benches/peers/Cargo.toml
VENV=benches/peers/.venv
if [ ! -x "$VENV/bin/celery" ]; then
  python3 -m venv "$VENV" || { echo "bench-peers: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
  "$VENV/bin/pip" install -q 'celery[redis]>=5.3,<6'
fi
LOADGEN=${CARGO_TARGET_DIR:-target}/release/loadgen
APALIS=${CARGO_TARGET_DIR:-benches/peers/target}/release/apalis_bench
CELERY="$VENV/bin/python benches/peers/celery_bench.py"
# Celery and kombu spell the default vhost `//`, not `/%2f`; a Redis URL
# names its database.
CELERY_AMQP=$(printf '%s' "$AMQP" | sed -E 's#/%2[fF]$#//#')
case "$REDIS" in *://*/*) CELERY_REDIS=$REDIS ;; *) CELERY_REDIS=$REDIS/0 ;; esac
APALIS_MYSQL=${PEERS_MYSQL_URL:-$(printf '%s' "$MYSQL" | sed -E 's#/[^/?]*(\?.*)?$#/gpupool_peers\1#')}

OUT=$(mktemp)
# What ran so far is kept if a run fails.
trap 'echo "bench-peers: failed; the runs so far are in $OUT" >&2' ERR
gp() { "$LOADGEN" --queue "$2" --jobs "$JOBS" --consumers "$C" --rounds 1 --no-floors --only push,drainc,drain1w |
  sed "s/^BENCH /BENCH broker=$1 /" | tee -a "$OUT" >&2; }
# A peer run that fails or does not end within PEER_TIMEOUT seconds (apalis
# 0.7 on MySQL at 1 ms can stop on "an error during streaming" and wait
# for ever) is left out of the medians and named under the table.
PEER_TIMEOUT=${PEER_TIMEOUT:-120}
peer() {
  local broker=$1 who=$2 rc=0 out
  shift 2
  out=$(timeout "$PEER_TIMEOUT" "$@") || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "bench-peers: $broker/$who exited $rc (124: no end within ${PEER_TIMEOUT}s); left out" >&2
    echo "MISS broker_name=$broker who=$who rc=$rc round=$r" >> "$OUT"
    return 0
  fi
  printf '%s\n' "$out" | sed "s/^PEER /PEER broker_name=$broker /" | tee -a "$OUT" >&2
}
# apalis polls its backend on a timer (default 100 ms, which caps a drain
# at 10 fetches a second); it runs at 10 ms, the setting the targets are
# measured against, and at 1 ms, its fastest (each poll is a query, idle or
# not). Each prints poll_ms, which names its row.
for r in $(seq "$ROUNDS"); do
  echo "== round $r of $ROUNDS" >&2
  gp redis "$REDIS"
  for ms in 10 1; do
    peer redis "apalis@$ms" "$APALIS" --backend redis --url "$REDIS" --jobs "$JOBS" --concurrency "$C" --poll-ms $ms
  done
  peer redis celery $CELERY --broker "$CELERY_REDIS" --jobs "$JOBS" --concurrency "$C"
  gp mysql "$MYSQL"
  for ms in 10 1; do
    peer mysql "apalis@$ms" "$APALIS" --backend mysql --url "$APALIS_MYSQL" --jobs "$JOBS" --concurrency "$C" --poll-ms $ms
  done
  gp amqp "$AMQP"
  peer amqp celery $CELERY --broker "$CELERY_AMQP" --jobs "$JOBS" --concurrency "$C"
done

python3 - "$OUT" "$ARGS" "$JOBS" "$ROUNDS" <<'PY'
import datetime, os, platform, re, statistics, sys
from collections import defaultdict
runs = defaultdict(list)  # (broker, who, figure) -> values
missed = []
for line in open(sys.argv[1]):
    parts = line.split()
    if not parts or parts[0] not in ("BENCH", "PEER", "MISS"):
        continue
    kv = dict(p.split("=", 1) for p in parts[1:])
    if parts[0] == "MISS":
        why = "no end within the time limit" if kv["rc"] == "124" else f"exit {kv['rc']}"
        missed.append(f"{kv['broker_name']}/{kv['who']} in round {kv['round']} ({why})")
    elif parts[0] == "BENCH":
        runs[(kv["broker"], "gpupool", kv["figure"])].append(float(kv["value"]))
    else:
        who = kv["peer"] + (f"@{kv['poll_ms']}" if "poll_ms" in kv else "")
        for fig in ("push_per_s", "drain_per_s"):
            runs[(kv["broker_name"], who, fig)].append(float(kv[fig]))
med = {k: statistics.median(v) for k, v in runs.items()}
def fmt(v):
    return "-" if v is None else f"{v:,.0f}/s"
def ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.2f}×"
rows = []
names = {"redis": "Redis 7", "mysql": "MariaDB 10.11", "amqp": "RabbitMQ 3.10"}
for broker, peer, version in (("redis", "apalis@10", "apalis 0.7, poll 10 ms"),
                              ("redis", "apalis@1", "apalis 0.7, poll 1 ms"),
                              ("mysql", "apalis@10", "apalis 0.7, poll 10 ms"),
                              ("mysql", "apalis@1", "apalis 0.7, poll 1 ms"),
                              ("redis", "celery", "Celery 5"), ("amqp", "celery", "Celery 5")):
    g = lambda f: med.get((broker, "gpupool", f))
    p = lambda f: med.get((broker, peer, f))
    if p("drain_per_s") is None:
        continue
    rows.append(f"| {names[broker]} | {version} | {fmt(p('push_per_s'))} | {fmt(g('push_per_s'))} | "
                f"{ratio(g('push_per_s'), p('push_per_s'))} | {fmt(p('drain_per_s'))} | "
                f"{fmt(g('drain_per_s_1w8'))} | {ratio(g('drain_per_s_1w8'), p('drain_per_s'))} | "
                f"{fmt(g('drain_per_s_8c'))} | {ratio(g('drain_per_s_8c'), p('drain_per_s'))} |")
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
spread = "; ".join(f"{b}/{w}/{f}: {', '.join(f'{v:,.0f}' for v in vs)}" for (b, w, f), vs in sorted(runs.items()))
table = (f"Machine: {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}. "
         f"Date: {datetime.date.today()}. Command: `{' '.join(['scripts/bench-peers.sh'] + sys.argv[2].split())}` "
         f"({sys.argv[3]} no-op jobs, concurrency 8, median of {sys.argv[4]} interleaved rounds).\n\n"
         "| broker | peer | peer push | gpupool push | push × | peer drain | gpupool drain, 1 worker × 8 slots | × | "
         "gpupool drain, 8 consumers | × |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
         + "\n".join(rows) + f"\n\nEvery run (jobs/s): {spread}.\n"
         + (f"\nLeft out of the medians: {'; '.join(missed)}.\n" if missed else ""))
path = "BENCHMARKS.md"
text = open(path).read()
start, end = "<!-- peers:start -->", "<!-- peers:end -->"
if start not in text:
    sys.exit("BENCHMARKS.md has no peers table markers")
text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: start + "\n" + table + end, text, flags=re.S)
open(path, "w").write(text)
print(table)
PY
rm -f "$OUT"
