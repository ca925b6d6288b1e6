#!/usr/bin/env bash
# The chaos suite on SQLite and on every server backend whose test URL is
# set (GPUPOOL_TEST_MYSQL_URL, GPUPOOL_TEST_REDIS_URL, GPUPOOL_TEST_AMQP_URL):
# workers killed and frozen, the backend restarted (it must run on this
# host, and this script as root, for `mariadb-admin`, `redis-cli` and
# `rabbitmqctl`), connections cut. Prints RELIABILITY.md's table.
#
#   scripts/chaos.sh                 # 120 s per backend, release build
#   scripts/chaos.sh --secs 30       # CI's short version (debug build)
#
# Extra arguments go to every `gpupool-chaos` run. Exits 1 if any backend's
# run fails a check.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${CHAOS_PROFILE:-release}
if [ "$profile" = release ]; then
  cargo build -q --release -p gpupool-chaos
else
  cargo build -q -p gpupool-chaos
fi
chaos=$PWD/target/$([ "$profile" = release ] && echo release || echo debug)/gpupool-chaos
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--secs 120)

queues=(sqlite)
for var in GPUPOOL_TEST_MYSQL_URL GPUPOOL_TEST_REDIS_URL GPUPOOL_TEST_AMQP_URL; do
  [ -n "${!var:-}" ] && queues+=("${!var}")
done
rows=()
failed=0
for q in "${queues[@]}"; do
  if row=$("$chaos" --queue "$q" "${args[@]}"); then
    rows+=("$row")
  else
    rows+=("$row")
    failed=1
  fi
done
echo
echo "| Backend | Run | Faults injected | Jobs | Executions | Duplicates | Leftover processes | Lost jobs |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
exit $failed
