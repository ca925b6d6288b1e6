#!/usr/bin/env bash
# Exercises the `testcontainers` feature of the server backends' tests up to
# the point where it needs Docker: with no test URL set, each backend's
# conformance test must try to start its container and, where no Docker
# daemon answers, say so and skip. With Docker, the same command runs the
# test against the container instead (the check then passes too).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp)
trap 'rm -f "$out"' EXIT
env -u GPUPOOL_TEST_MYSQL_URL -u GPUPOOL_TEST_REDIS_URL -u GPUPOOL_TEST_AMQP_URL GPUPOOL_REQUIRE_BACKENDS=0 \
  cargo test -p gpupool-mysql -p gpupool-redis -p gpupool-amqp \
  --features gpupool-mysql/testcontainers,gpupool-redis/testcontainers,gpupool-amqp/testcontainers \
  --test conformance push_reserve_complete -- --exact --nocapture 2>&1 | tee "$out"
for what in MySQL Redis RabbitMQ; do
  if grep -q "skipped: $what test" "$out"; then
    # No Docker here: the container start must have been tried and named.
    grep -Eiq "testcontainers: no (mariadb|mysql|redis|rabbitmq) container" "$out" || {
      echo "check-testcontainers: $what skipped without trying a container" >&2
      exit 1
    }
    echo "check-testcontainers: $what: container start tried, no Docker daemon, skipped as documented"
  else
    echo "check-testcontainers: $what: ran against a container"
  fi
done
