#!/usr/bin/env bash
# Log shipping's cost on every backend (benches/src/bin/shipping.rs) and
# rewrites its table in BENCHMARKS.md.
#   scripts/bench-shipping.sh [--secs S]
# URLs: GPUPOOL_TEST_MYSQL_URL, GPUPOOL_TEST_REDIS_URL, GPUPOOL_TEST_AMQP_URL
# (defaults: the loopback services of this project's machines).
set -euo pipefail
cd "$(dirname "$0")/.."
MYSQL=${GPUPOOL_TEST_MYSQL_URL:-mysql://gpupool:gpupool@127.0.0.1:3306/gpupool_test}
REDIS=${GPUPOOL_TEST_REDIS_URL:-redis://127.0.0.1:6379}
AMQP=${GPUPOOL_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
cargo build --release -q -p gpupool-benches --bin shipping
OUT=$(mktemp)
for url in "sqlite://ship.db" "$MYSQL" "$REDIS" "$AMQP"; do
  echo "== ${url%%:*}" >&2
  ./target/release/shipping --queue "$url" "$@" | tee -a "$OUT" >&2
done
python3 - "$OUT" "$*" <<'PY'
import datetime, os, platform, re, sys
rows = {}
for l in open(sys.argv[1]):
    if l.startswith("BENCH "):
        kv = dict(p.split("=", 1) for p in l.split()[1:])
        rows.setdefault(kv["backend"], {})[kv["figure"]] = kv["value"]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
head = (f"Machine: {os.cpu_count()} cores ({cpu}). Date: {datetime.date.today()}. "
        f"Command: `scripts/bench-shipping.sh {sys.argv[2]}`.\n\n"
        "| backend | ship writes/s per job | shipped bytes/s per job | dispatch p50, shipping on | dispatch p50, shipping off |\n"
        "| --- | --- | --- | --- | --- |\n")
body = "".join(
    f"| {b} | {f['ship_writes_per_s_per_job']} | {f['ship_bytes_per_s_per_job']} | "
    f"{f['dispatch_ms_p50_shipping_on']} ms | {f['dispatch_ms_p50_shipping_off']} ms |\n"
    for b, f in rows.items())
table = head + body
path = "BENCHMARKS.md"
text = open(path).read()
start, end = "<!-- shipping:start -->", "<!-- shipping:end -->"
text = re.sub(re.escape(start) + ".*?" + re.escape(end), start + "\n" + table + end, text, flags=re.S)
open(path, "w").write(text)
print(table)
PY
rm -f "$OUT" ship.db ship.db-wal ship.db-shm
