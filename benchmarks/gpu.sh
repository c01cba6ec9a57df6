#!/usr/bin/env bash
# One run of the speed benchmarks on a CUDA GPU, in at most about 8 minutes, with no network:
# train_speed, recipe_time, encode_speed, label_speed and precision_speed in each precision,
# and serve_load (many clients, then one client for the latency of one image). Each benchmark's
# output goes to $OUT (default: a new temporary folder), and one table of the figures, with the
# device's name, is printed at the end.
#
# Needs an environment where `import torch` sees CUDA and protext's dependencies are installed
# (pip install -e ".[test]" with a CUDA build of torch); the models are random and built here.
# SMOKE=1 DEVICE=cpu runs every step tiny on the CPU, to check the script itself.
#
#     bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEVICE="${DEVICE:-cuda}"
SMOKE="${SMOKE:-0}"
export DEVICE
python - <<'EOF' || exit 2
import os
import sys
try:
    import torch
except ImportError:
    sys.exit("benchmarks/gpu.sh: torch is not installed here")
if os.environ["DEVICE"] == "cuda" and not torch.cuda.is_available():
    sys.exit("benchmarks/gpu.sh measures a CUDA GPU, and torch sees none here (SMOKE=1 DEVICE=cpu checks the script)")
name = torch.cuda.get_device_name() if os.environ["DEVICE"] == "cuda" else "CPU"
print(f"device: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
size() { [ "$SMOKE" = 1 ] && echo "$2" || echo "$1"; }  # size FULL SMOKE
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
started=$SECONDS

step() {  # step NAME SECONDS COMMAND...: run one benchmark under a time limit, keep its output
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s)"
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    tail -n 4 "$out/$name.txt"
    [ $rc -eq 0 ] || echo "($name stopped with status $rc)" | tee -a "$out/$name.txt"
}

if [ "$DEVICE" = cuda ]; then precisions="fp32 bf16 fp16"; serving=bf16; else precisions="fp32 bf16"; serving=fp32; fi
limit() { [ "$SMOKE" = 1 ] && echo 900 || echo "$1"; }
step train_speed "$(limit 60)" python benchmarks/train_speed.py --device "$DEVICE" --fast-steps "$(size 30 1)" \
    --plain-steps "$(size 5 1)"
step recipe_time "$(limit 60)" python benchmarks/recipe_time.py --device "$DEVICE" --encode-texts "$(size 4096 16)" \
    --steps "$(size 10 1)"
step encode_speed "$(limit 45)" python benchmarks/encode_speed.py --device "$DEVICE" --texts "$(size 8192 64)"
for p in $precisions; do
    step "label_speed_$p" "$(limit 50)" python benchmarks/label_speed.py --device "$DEVICE" --precision "$p" \
        --images "$(size 2048 4)" --rounds "$(size 2 1)"
done
step precision_speed "$(limit 60)" python benchmarks/precision_speed.py --device "$DEVICE" \
    --precisions "$(echo $precisions | tr ' ' ,)" --images "$(size 4096 4)" --rounds "$(size 2 1)" \
    --agreement-images "$(size 200 4)"
step serve_load "$(limit 70)" python benchmarks/serve_load.py --vit-b16 --device "$DEVICE" --precision "$serving" \
    --clients "$(size 16 2)" --requests "$(size 16 1)"
step serve_latency "$(limit 50)" python benchmarks/serve_load.py --vit-b16 --device "$DEVICE" --precision "$serving" \
    --clients 1 --requests "$(size 100 2)" --max-wait-ms 0

python - "$out" $((SECONDS - started)) <<'EOF'
import re
import sys
from pathlib import Path

import torch

out, seconds = Path(sys.argv[1]), sys.argv[2]


def lines(name: str) -> list[str]:
    path = out / f"{name}.txt"
    return path.read_text().splitlines() if path.is_file() else []


def last(name: str, pattern: str) -> str:
    found = [m.group(1) for line in lines(name) for m in [re.search(pattern, line)] if m]
    return found[-1] if found else "not measured"


def row(name: str, pattern: str) -> list[str]:
    """The cells of the table row whose first cell matches `pattern`."""
    for line in lines(name):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and re.search(pattern, cells[0]):
            return cells
    return []


import os

device = torch.cuda.get_device_name() if os.environ["DEVICE"] == "cuda" else "CPU"
print(f"\n{device}: benchmarks/gpu.sh ({seconds} s; outputs in {out})\n")
print("| benchmark | setting | figure |")
print("|---|---|---|")
cells = row("train_speed", r"^fast$")
print(f"| train_speed | protext's step, steps/s (pairs/s) | {f'{cells[2]} ({cells[3]})' if cells else 'not measured'} |")
print(f"| train_speed | fast / plain steps per second | {last('train_speed', r'fast/plain steps per second: ([0-9.]+)')} |")
print(f"| recipe_time | one-time encoding | {last('recipe_time', r'one-time encoding: (.*)')} |")
for line in lines("recipe_time"):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("|") and len(cells) == 5 and cells[0] not in ("batching", "---"):
        print(f"| recipe_time | batching {cells[0]}: s/step, projected 10-epoch recipe | {cells[2]} s, {cells[4]} min |")
cells = row("encode_speed", r"default")
print(f"| encode_speed | texts/s, by length (default) | {cells[1] if cells else 'not measured'} |")
for p in ("fp32", "bf16", "fp16"):
    cells = row(f"label_speed_{p}", r"protext label")
    print(f"| label_speed | protext label, {p}, images/s | {cells[1] if cells else 'not measured'} |")
    cells = row(f"label_speed_{p}", r"bare forward")
    print(f"| label_speed | bare forward, {p}, images/s | {cells[1] if cells else 'not measured'} |")
for p in ("fp32", "bf16", "fp16"):
    cells = row("precision_speed", rf"^{p}$")
    text = f"{cells[1]} images/s, x{cells[2]} fp32, cosine min {cells[4]}, top-1 agreement {cells[5]}" if cells \
        else "not measured"
    print(f"| precision_speed | image tower alone, {p} | {text} |")
cells = row("serve_load", r"^batching")
print(f"| serve_load | many clients: images/s, p50 s, p99 s | "
      f"{', '.join(cells[1:4]) if cells else 'not measured'} |")
print(f"| serve_load | serve / bare batched forward | {last('serve_load', r'efficiency.*: ([0-9.]+)')} |")
cells = row("serve_latency", r"^batching")
print(f"| serve_load | 1 client, 1 image a request: p50 s, p99 s | "
      f"{', '.join(cells[2:4]) if cells else 'not measured'} |")
EOF
