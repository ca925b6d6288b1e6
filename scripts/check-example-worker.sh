#!/usr/bin/env bash
# `cargo run --example worker -- URL REPO` against each backend's URL: a real
# git repository, one job pushed with the `gpupool` command, the example
# worker run with --burst, and the job read back as succeeded. Each backend
# gets its own prefix, removed at the end. URLs come from the test variables
# (GPUPOOL_TEST_MYSQL_URL, …); a backend whose variable is unset is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p gpupool-cli --bin gpupool
cargo build -q -p gpupool-examples --example worker
gpupool=$PWD/target/debug/gpupool
worker=$PWD/target/debug/examples/worker
tag="exw$(date +%s)$$"
tmp=$(mktemp -d)
cleanup() {
  [ -n "${GPUPOOL_TEST_MYSQL_URL:-}" ] && command -v mariadb >/dev/null &&
    mariadb -N -e "SELECT CONCAT('DROP TABLE \`', table_name, '\`;') FROM information_schema.tables
                   WHERE table_schema='gpupool_test' AND table_name LIKE '${tag}\_%'" |
    mariadb gpupool_test || true
  [ -n "${GPUPOOL_TEST_REDIS_URL:-}" ] && command -v redis-cli >/dev/null &&
    redis-cli --scan --pattern "${tag}:*" | xargs -r redis-cli del >/dev/null || true
  [ -n "${GPUPOOL_TEST_AMQP_URL:-}" ] && command -v rabbitmqctl >/dev/null &&
    rabbitmqctl -q list_queues name | grep "^${tag}\." | xargs -r -n1 rabbitmqctl -q delete_queue >/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

repo=$tmp/repo
mkdir -p "$repo"
printf 'import sys\nprint("trained with", sys.argv[1:])\n' >"$repo/train.py"
git -C "$repo" init -q -b main
git -C "$repo" add train.py
git -C "$repo" -c user.name=t -c user.email=t@example.com commit -qm train
printf '{"git_ref": "main", "entrypoint": "train.py", "args": {"lr": 0.1}}\n' >"$tmp/job.json"

with_query() { case "$1" in *\?*) echo "$1&$2" ;; *) echo "$1?$2" ;; esac; }
urls=("sqlite://$tmp/queue.db")
[ -n "${GPUPOOL_TEST_MYSQL_URL:-}" ] && urls+=("$(with_query "$GPUPOOL_TEST_MYSQL_URL" "prefix=${tag}_")")
[ -n "${GPUPOOL_TEST_REDIS_URL:-}" ] && urls+=("$(with_query "$GPUPOOL_TEST_REDIS_URL" "prefix=${tag}:")")
[ -n "${GPUPOOL_TEST_AMQP_URL:-}" ] && urls+=("$(with_query "$GPUPOOL_TEST_AMQP_URL" "prefix=${tag}.")")

failed=0
for url in "${urls[@]}"; do
  shown=${url%%://*}
  "$gpupool" --queue "$url" init >/dev/null
  id=$("$gpupool" --queue "$url" --json push "$tmp/job.json" | tr -d '[]" \n')
  GPUPOOL_LOG=warn timeout 120 "$worker" "$url" "$repo" --burst >"$tmp/worker.out" 2>&1 || true
  state=$("$gpupool" --queue "$url" --json jobs --id "$id" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["state"])')
  if [ "$state" = succeeded ]; then
    echo "check-example-worker: $shown: job $id succeeded"
  else
    echo "check-example-worker: $shown: job $id is $state" >&2
    cat "$tmp/worker.out" >&2
    failed=1
  fi
done
exit $failed
