#!/usr/bin/env bash
# Every check of the CUDA path in one run, for the few minutes a GPU is lent (see BENCHMARKS.md):
#   1. tests/test_cuda.py: cached sampling with CUDA-graph rows == naive, graphs captured at engine start,
#      batch invariance in float32 on CUDA, the engine batching concurrent requests exactly;
#   2. pixelcnn bench sampling --device cuda (batch 1, 16, 64: cached vs one forward pass);
#   3. pixelcnn bench http against a CUDA server (/sample n=64 vs /likelihood of 64, 16 concurrent n=1);
#   4. a short training run with bf16 autocast (synthetic 28x28 data: the machine may have no dataset).
# Results go to $OUT (default ./gpu-check), one file per step; the summary at the end names the targets.
# Usage: deploy/gpu_check.sh   (from the repository root; needs torch with CUDA and the project installed)
set -uo pipefail

out=${OUT:-gpu-check}
mkdir -p "$out"
port=${PIXELCNN_CHECK_PORT:-8123}
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME COMMAND...: run it, keep its output in $out/NAME.log, remember a failure
    local name=$1
    shift
    echo "== $name: $*"
    if ! "$@" 2>&1 | tee "$out/$name.log"; then
        echo "!! $name failed"
        status=1
    fi
}

python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
    || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>&1 || true

step cuda-tests python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
step bench-sampling pixelcnn bench sampling model_store/fashion-mnist --device cuda --naive-rows 1 --lanes 1 --json

pixelcnn serve --device cuda --port "$port" > "$out/server.log" 2>&1 &
server=$!
for _ in $(seq 1 120); do
    curl -fs "http://127.0.0.1:$port/ready" > /dev/null 2>&1 && break
    sleep 1
done
step bench-http pixelcnn bench http --url "http://127.0.0.1:$port" --n 64 --repeats 5 --json
curl -fs "http://127.0.0.1:$port/metrics" > "$out/metrics.txt" 2>&1 || true
kill -TERM "$server" 2>/dev/null
wait "$server" 2>/dev/null

python3 - <<'PY'
import numpy as np

rng = np.random.default_rng(0)
images = rng.integers(0, 256, (2048, 28, 28), dtype=np.uint8)
np.savez("/tmp/gpu-check-data.npz", images=images, labels=rng.integers(0, 10, 2048))
PY
step train-bf16 pixelcnn train --data /tmp/gpu-check-data.npz --arch gated --channels 48 --layers 7 --conditional \
    --epochs 1 --batch-size 256 --precision bf16 --device cuda --no-samples --final-eval-limit 256 \
    --out /tmp/gpu-check-model

python3 - "$out" <<'PY'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])

def last_json(name):
    lines = [line for line in (out / f"{name}.log").read_text().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None

sampling, http = last_json("bench-sampling"), last_json("bench-http")
if sampling:
    one = next(r for r in sampling["sampling"] if r["batch"] == 1)
    print(f"one image, cached: {one['cached_s'] * 1000:.1f} ms (target <= 25 ms)")
if http:
    print("http:", {k: v for k, v in http.items() if not isinstance(v, (list, dict))})
    print("target: /sample n=64 <= 10x /likelihood of 64")
tests = (out / "cuda-tests.log").read_text().strip().splitlines()
print("tests/test_cuda.py (CUDA-graph replay, batch invariance, cached == naive):", tests[-1] if tests else "no output")
PY
exit $status
