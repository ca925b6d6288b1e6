#!/usr/bin/env bash
# gpu-check.sh PATH_TO_GPUPOOL_BINARY
#
# A check of gpupool on a real NVIDIA GPU host (git, Python with PyTorch, no
# network, no database server: the embedded SQLite queue). It makes a
# repository with a small PyTorch training script, pushes three 1-GPU runs,
# one run that runs out of GPU memory and one CPU-only run, runs
# `gpupool worker --gpus auto --burst`, and prints one row per run: job,
# state, the GPU UUID torch saw, seconds, and the idle gap before it on the
# same GPU. Exit 0 only if every GPU run saw exactly its assigned GPU, the
# OOM run failed with kind `oom`, and the others succeeded.
set -euo pipefail

BIN=$(realpath "${1:?usage: gpu-check.sh PATH_TO_GPUPOOL_BINARY}")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpupool-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export GPUPOOL_QUEUE="sqlite://$WORK/queue.db" GPUPOOL_DATA_DIR="$WORK/data"
OUT="$WORK/out"
mkdir -p "$OUT" "$WORK/repo"

echo "== host"
nvidia-smi --query-gpu=index,uuid,name,memory.total --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())'
"$BIN" --version

cat > "$WORK/repo/train.py" <<'PY'
import json, os, sys, time
t0 = time.time()
import argparse
import torch
p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=200)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--oom", action="store_true")
p.add_argument("--name", default="run")
a = p.parse_args()
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
rec = {"job": os.environ["GPUPOOL_JOB_ID"], "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
       "device": str(dev), "start": t0, "count": torch.cuda.device_count()}
if dev.type == "cuda":
    props = torch.cuda.get_device_properties(0)
    rec["uuid"] = "GPU-" + str(props.uuid) if not str(props.uuid).startswith("GPU-") else str(props.uuid)
    rec["gpu_name"] = props.name
if a.oom:
    free, total = torch.cuda.mem_get_info()
    x = torch.empty(int(total * 4), dtype=torch.uint8, device=dev)  # more than the card has
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10)).to(dev)
opt = torch.optim.SGD(model.parameters(), lr=a.lr)
x = torch.randn(4096, 512, device=dev)
y = torch.randint(0, 10, (4096,), device=dev)
for step in range(a.steps):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    if step % 50 == 0:
        print(f"[{a.name}] step {step} loss {loss.item():.4f}", flush=True)
if dev.type == "cuda":
    torch.cuda.synchronize()
rec["end"] = time.time()
rec["loss"] = loss.item()
with open(os.path.join(os.environ["GPU_CHECK_OUT"], rec["job"] + ".json"), "w") as f:
    json.dump(rec, f)
PY
git -C "$WORK/repo" init -q
git -C "$WORK/repo" add train.py
git -C "$WORK/repo" -c user.name=check -c user.email=check@example.com commit -qm "tiny PyTorch training script"
git -C "$WORK/repo" branch -M main

E="\"env\": {\"GPU_CHECK_OUT\": \"$OUT\"}"
cat > "$WORK/jobs.json" <<JSON
[
  {"git_ref": "main", "entrypoint": "train.py", "gpus": 1, "args": {"name": "gpu-a", "lr": 0.01}, $E},
  {"git_ref": "main", "entrypoint": "train.py", "gpus": 1, "args": {"name": "gpu-b", "lr": 0.003}, $E},
  {"git_ref": "main", "entrypoint": "train.py", "gpus": 1, "args": {"name": "gpu-c", "lr": 0.001}, $E},
  {"git_ref": "main", "entrypoint": "train.py", "gpus": 1, "max_attempts": 1, "args": {"name": "oom", "oom": true}, $E},
  {"git_ref": "main", "entrypoint": "train.py", "gpus": 0, "args": {"name": "cpu", "steps": 20}, $E}
]
JSON

echo "== gpupool"
"$BIN" init
"$BIN" push "$WORK/jobs.json"
START=$(date +%s.%N)
"$BIN" worker --gpus auto --burst --repo "$WORK/repo" --lease 60s --heartbeat 5s 2>"$WORK/worker.log" || {
  cat "$WORK/worker.log"; exit 1; }
END=$(date +%s.%N)
"$BIN" jobs
"$BIN" jobs --json > "$WORK/jobs.out.json"
"$BIN" errors --json > "$WORK/errors.out.json"
nvidia-smi --query-gpu=index,uuid --format=csv,noheader > "$WORK/uuids.csv"

echo "== result"
python3 - "$WORK" "$OUT" "$START" "$END" <<'PY'
import json, os, sys
work, out, start, end = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
jobs = json.load(open(os.path.join(work, "jobs.out.json")))
errors = json.load(open(os.path.join(work, "errors.out.json")))
uuids = {}
for line in open(os.path.join(work, "uuids.csv")):
    i, u = [p.strip() for p in line.split(",")]
    uuids[int(i)] = u
runs = {}
for name in os.listdir(out):
    r = json.load(open(os.path.join(out, name)))
    runs[r["job"]] = r
ok = True
rows, last_end = [], {}
for j in sorted(jobs, key=lambda j: int(j["id"])):
    r = runs.get(j["id"], {})
    name = j["args"].get("name")
    given = j["gpu_ids"] or []
    seen = r.get("uuid", "-")
    secs = f'{r["end"] - r["start"]:.1f}' if "end" in r else "-"
    gap = "-"
    if given and "start" in r:
        g = given[0]
        if g in last_end:
            gap = f"{r['start'] - last_end[g]:.2f}"
        if "end" in r:
            last_end[g] = r["end"]
    problems = []
    if name == "oom":
        kinds = [e["kind"] for e in errors if e["job_id"] == j["id"]]
        if j["state"] != "failed" or kinds != ["oom"]:
            problems.append(f"expected failed with kind oom, got {j['state']} {kinds}")
    else:
        if j["state"] != "succeeded":
            problems.append(f"expected succeeded, got {j['state']}")
    if j["gpus"] == 1 and name != "oom":
        if len(given) != 1 or r.get("count") != 1 or seen != uuids.get(given[0]):
            problems.append(f"assigned GPU {given} ({[uuids.get(g) for g in given]}) but torch saw {seen} ({r.get('count')} device(s))")
    if j["gpus"] == 0 and (r.get("device") != "cpu" or r.get("visible") != ""):
        problems.append(f"the CPU run saw device {r.get('device')} with CUDA_VISIBLE_DEVICES={r.get('visible')!r}")
    ok &= not problems
    rows.append((j["id"], name, j["state"], ",".join(map(str, given)) or "cpu", seen, secs, gap, "; ".join(problems) or "ok"))
head = ("JOB", "NAME", "STATE", "GPU", "UUID TORCH SAW", "SECONDS", "IDLE GAP", "CHECK")
widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
for row in (head, *rows):
    print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
print(f"worker wall time: {end - start:.1f} s")
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
