#!/usr/bin/env bash
# One-shot GPU check of the CUDA decode path (issue #5), for a session with one GPU. Installs nothing: run it
# where a CUDA build of torch (and triton) is already installed, e.g. the serving image or a prepared venv.
#
#   bench/gpu_check.sh            (PYTHON=... to choose the interpreter; NO_COMPILE=1 skips torch.compile)
#   SECTIONS=e2e DEVICE=cpu bench/gpu_check.sh    (only the end-to-end part, on CPU: checks this script)
#
# Prints, in this order (about 3-4 min on one H100):
#   1. the GPU tests of the suite (pytest -m cuda: graphs vs eager, step vs forward, Triton vs PyTorch);
#   2. bench/cuda_check.py: correctness on the paper config (fp32 <= 1e-4, bf16 tolerance, graphs == eager,
#      Triton vs PyTorch), then Decoder.step latency / tokens/s at batch 1, 8, 64, 256 for eager, graphs,
#      graphs + Triton (+ graphs + torch.compile), bf16; targets: batch 1 <= 100 us, batch 256 <= 300 us;
#   3. end to end: gam-serve --device cuda on 127.0.0.1 and a short closed-loop load test against it;
#   4. host path (issue #13): bench/host.py --quick on the device, served vs the bare step, bf16, with the
#      --stream-interval, --overlap off (the overlap scheduler's gain) and 2-frontend variants (at most 4 min).
# Results land in bench/results/ (cuda_check.json, gpu_load.json/.png, gpu_check.log).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
RES=bench/results
mkdir -p "$RES"
exec > >(tee "$RES/gpu_check.log") 2>&1
status=0
SECTIONS=${SECTIONS:-env tests check e2e host}
DEVICE=${DEVICE:-cuda}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
section() { printf '\n=== %s (%s) ===\n' "$1" "$(date -u +%H:%M:%S)"; }

if want env; then
section "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); sys.exit(0 if torch.cuda.is_available() else 1)' \
  || { echo "no CUDA torch in $PY: nothing to check"; exit 2; }
"$PY" -c 'import triton; print("triton", triton.__version__)' || echo "triton not importable: Triton variants will fail"
fi

if want tests; then
section "pytest -m cuda"
timeout 300 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/gam_model || status=1
fi

if want check; then
section "cuda_check (correctness + step latency)"
compile_flag=$([ "${NO_COMPILE:-0}" = 1 ] && echo --no-compile || true)
timeout 360 "$PY" bench/cuda_check.py $compile_flag --out "$RES/cuda_check.json" || status=1
fi

if want e2e; then
section "end to end: gam-serve --device $DEVICE + load test"
model_dir=$("$PY" -c 'from bench.common import bundled_model_dir as b; print(b() or "")')
if [ -z "$model_dir" ]; then  # no bundled model: paper config, random weights
  model_dir=$(mktemp -d)/gam-random
  "$PY" -c "import sys; from pathlib import Path; from bench.common import random_paper_checkpoint as r; r(Path(sys.argv[1]))" "$model_dir" || status=1
fi
# --port 0: the kernel picks a free port for the server's own socket (a port picked here and passed on can be taken)
"$PY" -m server.cli --model "$model_dir" --host 127.0.0.1 --port 0 --device "$DEVICE" --dtype bfloat16 \
  --max-batch-size 64 --cuda-graphs --log-level warning &
server=$!
# (psutil: the dev extra; its absence, the server's exit or no listener is said here, not hidden)
port=$("$PY" -c 'import sys; from bench.common import listening_port as lp
port = lp(int(sys.argv[1]), 180)  # up to 180 s: model load and CUDA graph capture come first
sys.exit(print(port) if port else "gam-serve exited before it listened, or did not listen in 180 s")' "$server")
healthy=0
for _ in $([ -n "$port" ] && seq 1 180); do
  if "$PY" -c "import httpx, sys; sys.exit(httpx.get('http://127.0.0.1:$port/health', timeout=2).status_code != 200)" 2>/dev/null; then
    healthy=1; break
  fi
  kill -0 "$server" 2>/dev/null || break
  sleep 1
done
if [ "$healthy" = 1 ]; then
  "$PY" -c "import httpx; print('info:', httpx.get('http://127.0.0.1:$port/info', timeout=5).text)"
  timeout 120 "$PY" -m load_tests --url "http://127.0.0.1:$port" --api tgi --scenario smoke --mode closed \
    --concurrency "${CONCURRENCY:-32}" --num-requests "${REQUESTS:-256}" --duration 45 --input-len 64 --output-len 64 --no-progress \
    --out "$RES/gpu_load" || status=1
  curl -s "http://127.0.0.1:$port/metrics" | grep -E '^gam_(step_duration_seconds|batch_size)_(sum|count)' || true
else
  echo "gam-serve did not become healthy"; status=1
fi
kill -TERM "$server" 2>/dev/null; wait "$server" 2>/dev/null
fi

if want host; then
section "host path: bench/host.py --quick --device $DEVICE"
timeout 240 "$PY" bench/host.py --quick --device "$DEVICE" --dtype bfloat16 --out "$RES/host_$DEVICE.json" || status=1
fi

section "done: exit $status"

exit $status
