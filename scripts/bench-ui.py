#!/usr/bin/env python3
"""The dashboard's load on its backend with 1 and with 50 open dashboards,
measured in one run (BENCHMARKS.md, "Dashboard").

A MariaDB/MySQL queue (GPUPOOL_TEST_MYSQL_URL, a fresh table prefix) with
200 jobs, one `gpupool ui`, and N browsers' worth of clients: each loads
the jobs page and keeps its event stream open, while a job is pushed every
second so the pages have something to follow. The backend's load is the
server's own count of statements (`SHOW GLOBAL STATUS LIKE 'Questions'`),
less the pushes, over the measuring window, and the dashboard poller's
count of reads (`/poller`).

    scripts/bench-ui.py [--secs 30] [--gpupool target/release/gpupool]
"""
import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid

p = argparse.ArgumentParser()
p.add_argument("--secs", type=float, default=30)
p.add_argument("--gpupool", default="target/release/gpupool")
p.add_argument("--clients", default="1,50")
args = p.parse_args()

base = os.environ.get("GPUPOOL_TEST_MYSQL_URL", "mysql://gpupool:gpupool@127.0.0.1:3306/gpupool_test")
prefix = "uibench_%s_" % uuid.uuid4().hex[:8]
url = base + ("&" if "?" in base else "?") + "prefix=" + prefix
parsed = urllib.parse.urlparse(base)


def gp(*a, **kw):
    return subprocess.run([args.gpupool, "--queue", url, *a], check=True, capture_output=True, text=True, **kw)


def questions():
    out = subprocess.run(
        ["mariadb", "-h", parsed.hostname, "-P", str(parsed.port or 3306), "-u", parsed.username,
         "-p" + (parsed.password or ""), "-N", "-e", "SHOW GLOBAL STATUS LIKE 'Questions'"],
        check=True, capture_output=True, text=True).stdout
    return int(out.split()[1])


gp("init")
jobs = [{"git_ref": "main", "entrypoint": "train.py", "name": "bench %d" % i} for i in range(200)]
with open("/tmp/%sjobs.json" % prefix, "w") as f:
    json.dump(jobs, f)
gp("push", "/tmp/%sjobs.json" % prefix)

ui = subprocess.Popen([args.gpupool, "--queue", url, "ui", "--listen", "127.0.0.1:0", "--token", "bench-token"],
                      stderr=subprocess.PIPE, text=True)
line = ui.stderr.readline()
addr = re.search(r"http://([^/]+)/", line).group(1)
host, port = addr.split(":")


def poller_reads():
    with urllib.request.urlopen("http://%s/poller" % addr) as r:
        return json.load(r)["backend_reads"]


def client(stop, seen):
    urllib.request.urlopen("http://%s/" % addr).read()
    s = socket.create_connection((host, int(port)))
    s.sendall(("GET /events/jobs HTTP/1.1\r\nHost: %s\r\n\r\n" % addr).encode())
    s.settimeout(0.5)
    while not stop.is_set():
        try:
            data = s.recv(65536)
        except socket.timeout:
            continue
        if not data:
            break
        seen[0] += data.count(b"event: update")
    s.close()


def pusher(stop):
    i = 0
    while not stop.is_set():
        with open("/tmp/%sone.json" % prefix, "w") as f:
            json.dump({"git_ref": "main", "entrypoint": "train.py", "name": "live %d" % i}, f)
        gp("push", "/tmp/%sone.json" % prefix)
        i += 1
        time.sleep(1)
    return i


rows = []
for n in [int(c) for c in args.clients.split(",")]:
    stop = threading.Event()
    seen = [0]
    threads = [threading.Thread(target=client, args=(stop, seen)) for _ in range(n)]
    for t in threads:
        t.start()
    pushed = []
    push_thread = threading.Thread(target=lambda: pushed.append(pusher(stop)))
    time.sleep(3)  # every client has loaded its page and opened its stream
    q0, r0, t0 = questions(), poller_reads(), time.time()
    push_thread.start()
    time.sleep(args.secs)
    stop.set()
    push_thread.join()
    q1, r1, t1 = questions(), poller_reads(), time.time()
    for t in threads:
        t.join()
    secs = t1 - t0
    # A push is about 3 statements (connect handshake queries aside); the
    # pushes' CLI connections run a few more, counted the same in each row.
    rows.append((n, (q1 - q0) / secs, (r1 - r0) / secs, seen[0] / n, pushed[0]))

ui.terminate()
subprocess.run(["mariadb", "-h", parsed.hostname, "-P", str(parsed.port or 3306), "-u", parsed.username,
                "-p" + (parsed.password or ""), parsed.path.lstrip("/"), "-e",
                "DROP TABLE IF EXISTS {0}jobs, {0}job_errors, {0}workers, {0}job_logs, {0}blobs, {0}schema_version, "
                "{0}meta".format(prefix)], capture_output=True)

print("| open dashboards | backend statements/s (all clients, incl. 1 push/s) | dashboard reads/s | updates per dashboard | jobs pushed |")
print("| --- | --- | --- | --- | --- |")
for n, qps, rps, updates, pushed in rows:
    print("| %d | %.1f | %.2f | %.0f | %d |" % (n, qps, rps, updates, pushed))
