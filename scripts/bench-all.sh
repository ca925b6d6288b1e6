#!/usr/bin/env bash
# Runs loadgen on every backend and rewrites the table in BENCHMARKS.md.
#   scripts/bench-all.sh [--quick] [--scale]
# URLs: GPUPOOL_TEST_MYSQL_URL, GPUPOOL_TEST_REDIS_URL, GPUPOOL_TEST_AMQP_URL
# (defaults: the loopback services of this project's machines).
set -euo pipefail
cd "$(dirname "$0")/.."
MYSQL=${GPUPOOL_TEST_MYSQL_URL:-mysql://gpupool:gpupool@127.0.0.1:3306/gpupool_test}
REDIS=${GPUPOOL_TEST_REDIS_URL:-redis://127.0.0.1:6379}
AMQP=${GPUPOOL_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
cargo build --release -q -p gpupool-benches --bins -p gpupool-cli --bin gpupool
OUT=$(mktemp)
for url in "memory://" "sqlite://bench.db" "$MYSQL" "$REDIS" "$AMQP"; do
  echo "== ${url%%:*}" >&2
  ./target/release/loadgen --queue "$url" "$@" | tee -a "$OUT" >&2
done
python3 - "$OUT" "$*" <<'PY'
import datetime, os, platform, re, sys
lines = [l for l in open(sys.argv[1]) if l.startswith("BENCH ")]
rows = []
for l in lines:
    kv = dict(p.split("=", 1) for p in l.split()[1:])
    rows.append(f"| {kv['backend']} | {kv['figure']} | {kv['value']} {kv['unit']} | {kv['floor']} | {kv['ratio']} |")
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
head = (f"Machine: {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}. "
        f"Date: {datetime.date.today()}. Command: `scripts/bench-all.sh {sys.argv[2]}`.\n\n"
        "| backend | figure | value | floor | ratio |\n| --- | --- | --- | --- | --- |\n")
table = head + "\n".join(rows) + "\n"
path = "BENCHMARKS.md"
text = open(path).read()
start, end = "<!-- table:start -->", "<!-- table:end -->"
text = re.sub(re.escape(start) + ".*?" + re.escape(end), start + "\n" + table + end, text, flags=re.S)
open(path, "w").write(text)
print(table)
PY
rm -f "$OUT"
