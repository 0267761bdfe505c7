#!/usr/bin/env bash
# One-call GPU check (issue 13 points 5-6) for a session that is lent a GPU; at most ~8 minutes on
# one H200, each stage under a time limit drawn from one overall budget (GPU_CHECK_BUDGET seconds,
# default 460), so a slow stage is cut short ("timed out: not measured") instead of the whole call.
#
#   1. the CUDA-only tests (CUDA JPEG/degradation equality with the CPU, restore on CUDA)
#   2. cirlab-bench data: relative-GT pairs/s on CPU and CUDA
#   3. cirlab-bench train on CUDA: steps/s of each module at paper size, fp32 and bf16 + channels_last
#   4. cirlab-bench train with torch.compile (cresmd_paper; bf16 + channels_last + compile)
#   5. cirlab-bench cost on CUDA: Table-1 latency at HD, 2K, 4K, CResMD against the paper-shaped
#      (synthetic) TASNet, first and later passes
#
# On the lent machine (whose image has torch and lightning but not hydra/kornia): first, here,
#   scripts/gpu_site.sh
# then call the device tool's run with carry [".gpu_site"] and the command
#   CIRLAB_REV=<git rev-parse --short HEAD here> bash scripts/gpu_check.sh "$OUT"
# (timeout_s 560: the script stops itself within GPU_CHECK_BUDGET + ~60 s of start-up)
# and copy what comes back (train.json, data.json, cost/, gpu_check.log) into docs/bench/ (merge the
# JSON keys) and the printed tables into docs/results.md.
#
# Without CUDA (here) it is a dry run: the CUDA tests run and report their skip reasons, the
# benchmarks run once on the CPU at toy size to check the wiring (figures not meaningful, written
# to the output folder only), and every CUDA stage says it is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-/tmp/cirlab-gpu-check}}
BUDGET=${GPU_CHECK_BUDGET:-460}
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/gpu_check.log") 2>&1

if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .gpu_site ]; then
    if ls .gpu_site/wheels/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_site_wheels \
            .gpu_site/wheels/*.whl || echo "!! installing .gpu_site/wheels failed"
        export PYTHONPATH="$PYTHONPATH:/tmp/gpu_site_wheels"
    fi
    export PYTHONPATH="$PYTHONPATH:$PWD/.gpu_site/py"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
CACHE=${CIRLAB_GPU_CHECK_CACHE:-/tmp/cirlab-gpu-check-cache}
STATUS=0

remaining() { echo $(( BUDGET - SECONDS )); }
stage() {  # stage NAME LIMIT_SECONDS COMMAND...: run under min(LIMIT, what is left of the budget)
    local name=$1 limit=$2; shift 2
    local left; left=$(remaining)
    (( limit > left )) && limit=$left
    echo; echo "=== $name (limit ${limit} s, ${SECONDS} s elapsed) ==="
    if (( limit < 15 )); then echo "=== $name: skipped, the time budget is spent: not measured"; STATUS=1; return; fi
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if (( rc == 124 || rc == 137 )); then echo "=== $name: timed out after ${limit} s: not measured"; STATUS=1
    elif (( rc != 0 )); then echo "=== $name: failed (exit $rc)"; STATUS=1
    else echo "=== $name: done at ${SECONDS} s"; fi
}

# the copy on the device machine may come without .git: the caller passes its revision (CIRLAB_REV=...)
REV=${CIRLAB_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
echo "=== environment ($(date -u '+%Y-%m-%d %H:%M UTC'), rev $REV)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY - <<'EOF' | tee "$OUTDIR/env.txt"
import os, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA available {torch.cuda.is_available()}, "
      f"{os.cpu_count()} CPU cores")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, cuDNN {torch.backends.cudnn.version()}")
import lightning, hydra, kornia, cirlab  # noqa: F401  (fails here if .gpu_site was not carried)
print(f"lightning {lightning.__version__}, hydra {hydra.__version__}, kornia {kornia.__version__}")
EOF
if [ "${PIPESTATUS[0]}" != 0 ]; then echo "!! the environment is incomplete (carry .gpu_site, see the header)"; exit 2; fi
CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))")

stage "CUDA-only tests" 120 $PY -m pytest -q -rs -p no:cacheprovider tests/test_degradations.py tests/test_restore.py \
    tests/test_speed.py tests/test_worker_pairs.py \
    -k "cuda or gpu" -m "not slow"

if [ "$CUDA" = 1 ]; then
    stage "bench data (pairs/s, CPU and CUDA)" 60 $PY -m cirlab.cli.bench data --seconds 3 --num-workers 4 \
        --out "$OUTDIR/data.json"
    stage "bench train, fp32 and bf16+channels_last, every module" 190 $PY -m cirlab.cli.bench train --device cuda \
        --variants fp32,bf16+cl --steps 20 --warmup 5 --num-workers 0 --cache-dir "$CACHE" --out "$OUTDIR/train.json"
    stage "bench train, torch.compile (cresmd_paper)" 120 $PY -m cirlab.cli.bench train --device cuda \
        --experiments cresmd_paper --variants bf16+cl+compile --steps 20 --warmup 3 --num-workers 0 \
        --cache-dir "$CACHE" --out "$OUTDIR/train.json"
    stage "bench cost, Table-1 latency on CUDA (HD, 2K, 4K)" 70 $PY -m cirlab.cli.bench cost --device cuda \
        --synthetic --naive none --resolutions hd,2k,4k --repeats 3 --warmup 1 --out "$OUTDIR/cost/"
else
    echo; echo "=== no CUDA device: dry run. Skipped (need a GPU): bench data on CUDA, bench train on CUDA"
    echo "    (fp32, bf16+cl, bf16+cl+compile), bench cost on CUDA. Toy CPU runs check the wiring only:"
    TOY=(-- model.net.nf=8 model.net.nb=1 data.batch_size=2)
    stage "dry run: bench data (CPU, 1 s)" 90 $PY -m cirlab.cli.bench data --seconds 1 --num-workers 0 \
        --out "$OUTDIR/data.json"
    stage "dry run: bench train (CPU, toy network, 1 step)" 120 $PY -m cirlab.cli.bench train --device cpu \
        --experiments cresmd_paper,hyperres_3d_paper --variants fp32,bf16+cl --steps 1 --warmup 0 \
        --cache-dir "$CACHE" --out "$OUTDIR/train.json" "${TOY[@]}"
    stage "dry run: bench cost (CPU, toy network)" 60 $PY -m cirlab.cli.bench cost --device cpu --nf 8 --nb 2 \
        --synthetic --naive none --resolutions 32x48 --threads 1 --repeats 1 --warmup 0 --out "$OUTDIR/cost/"
fi

echo; echo "=== gpu check finished in ${SECONDS} s (budget ${BUDGET} s), status ${STATUS}; files in $OUTDIR:"
ls -la "$OUTDIR" "$OUTDIR/cost" 2>/dev/null
exit $STATUS
