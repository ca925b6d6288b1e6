"""Celery 5 on RabbitMQ or Redis: push then drain N no-op tasks.

    python celery_bench.py --broker URL --jobs N --concurrency C

Prints one line:

    PEER peer=celery broker=<amqp|redis> jobs=N concurrency=C push_per_s=X drain_per_s=Y

`scripts/bench-peers.sh` runs it from the venv it makes (benches/peers/.venv).

Settings: the safest Celery offers for long training runs, close to what
gpupool promises:

- task_acks_late: a task is acknowledged after it ran, so a worker that
  dies mid-run does not lose it (the default acks before running);
- worker_prefetch_multiplier=1: a worker holds no more tasks than it runs
  (the default holds 4 per thread, which a long run would strand);
- the threads pool with C threads: one worker process running C tasks;
- confirmed publish (RabbitMQ: publisher confirms; Redis: every write is
  acknowledged by the server anyway);
- no result backend (the queue alone, as gpupool's figures);
- Redis: visibility_timeout 12 h, so a run shorter than that is not handed
  to a second worker while it trains (the default, 1 h, would).

Push: one producer calls apply_async N times (each waits for its confirm).
Drain: a worker process (`celery worker`) is started once the tasks are
queued; the clock runs from the first task's start to the N-th task's end,
taken in the worker by Celery's task_prerun/task_postrun signals, so the
worker's own start-up (a second or more) is not counted against it.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

from celery import Celery
from celery.signals import task_postrun, task_prerun

QUEUE = os.environ.get("PEERS_QUEUE", "peers-bench")
JOBS = int(os.environ.get("PEERS_JOBS", "0"))
OUT = os.environ.get("PEERS_OUT", "")
BROKER = os.environ.get("PEERS_BROKER", "amqp://guest:guest@127.0.0.1:5672//")

app = Celery("celery_bench", broker=BROKER)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    result_backend=None,
    task_default_queue=QUEUE,
    broker_transport_options={"confirm_publish": True, "visibility_timeout": 12 * 3600},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="noop")
def noop(i):
    return None


_lock = threading.Lock()
_state = {"first": None, "done": 0}


@task_prerun.connect
def _started(**_):
    with _lock:
        if _state["first"] is None:
            _state["first"] = time.time()


@task_postrun.connect
def _ended(**_):
    with _lock:
        _state["done"] += 1
        if _state["done"] == JOBS and OUT:
            with open(OUT + ".tmp", "w") as f:
                f.write(f"{_state['first']} {time.time()}")
            os.rename(OUT + ".tmp", OUT)


def purge(broker, queue):
    with Celery(broker=broker).connection_for_write() as conn:
        ch = conn.default_channel
        try:
            ch.queue_purge(queue)
        except Exception:  # noqa: BLE001 - the queue may not exist yet
            pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--broker", required=True)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    queue = f"peers-bench-{os.getpid()}-{time.time_ns()}"
    app.conf.broker_url = args.broker
    app.conf.task_default_queue = queue
    purge(args.broker, queue)

    t = time.perf_counter()
    for i in range(args.jobs):
        noop.apply_async((i,), queue=queue)
    push = args.jobs / (time.perf_counter() - t)

    out = f"/tmp/celery-bench-{os.getpid()}.done"
    env = dict(os.environ, PEERS_QUEUE=queue, PEERS_JOBS=str(args.jobs), PEERS_OUT=out, PEERS_BROKER=args.broker)
    here = os.path.dirname(os.path.abspath(__file__))
    # The worker's own output (a warning when run as root) is shown only
    # if it fails.
    log = tempfile.TemporaryFile()
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_bench", "worker", "-P", "threads",
         "-c", str(args.concurrency), "-Q", queue, "--without-mingle", "--without-gossip",
         "--without-heartbeat", "-l", "WARNING"],
        cwd=here, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.time() + 600
        while not os.path.exists(out):
            if worker.poll() is not None:
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace"))
                sys.exit(f"celery worker exited with {worker.returncode} before the drain ended")
            if time.time() > deadline:
                sys.exit("celery drain did not end within 600 s")
            time.sleep(0.05)
        first, last = map(float, open(out).read().split())
        drain = args.jobs / (last - first)
    finally:
        worker.terminate()
        worker.wait(30)
        if os.path.exists(out):
            os.remove(out)
    # The queue is emptied and deleted where the broker keeps it.
    with Celery(broker=args.broker).connection_for_write() as conn:
        try:
            conn.default_channel.queue_delete(queue)
        except Exception:  # noqa: BLE001
            pass
    broker = args.broker.split(":", 1)[0]
    print(f"PEER peer=celery broker={broker} jobs={args.jobs} concurrency={args.concurrency} "
          f"push_per_s={push:.1f} drain_per_s={drain:.1f}", flush=True)


if __name__ == "__main__":
    main()
