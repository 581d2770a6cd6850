#!/usr/bin/env bash
# The GPU reference run in one call on a machine with a CUDA device: records the device, runs the CUDA
# tests, probes NATTEN on CUDA, runs `+experiment=gpu_sweep` within a time limit (rows already written
# survive the limit), writes its report and figures, and packs the run into $OUT/gpu_sweep.tgz.
#   OUT=/tmp/out SWEEP_LIMIT_S=300 bash scripts/gpu_run.sh [extra run_bench.py overrides]
# Wheels that the machine lacks (hydra-core, omegaconf, antlr4, submitit, natten) are carried in .whl/:
# make them here with scripts/gpu_wheels.sh, and pass carry=[".whl"] to the device tool.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qna_bench_gpu}
PYTHON=${PYTHON:-python3}
SWEEP_LIMIT_S=${SWEEP_LIMIT_S:-300}
RUN_DIR=${RUN_DIR:-/tmp/gpu_sweep}
mkdir -p "$OUT"
if [ -z "${NO_WHEELS:-}" ] && compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PYTHON" -c "import torch, timm, natten; print('torch', torch.__version__, 'timm', timm.__version__, 'natten', natten.__version__)"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
"$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests > "$OUT/cuda_tests.log" 2>&1
tail -n 3 "$OUT/cuda_tests.log"
"$PYTHON" scripts/natten_cuda_probe.py > "$OUT/natten_probe.txt" 2>&1
tail -n 4 "$OUT/natten_probe.txt"
start=$(date +%s)
timeout --signal=INT --kill-after=20 "$SWEEP_LIMIT_S" "$PYTHON" run_bench.py +experiment=gpu_sweep results_dir="$RUN_DIR" plots=false "$@" 2>&1 | tail -n 40
echo "sweep: $(( $(date +%s) - start )) s (limit ${SWEEP_LIMIT_S} s)"
"$PYTHON" -m qna_bench.report "$RUN_DIR/results.parquet" > /dev/null 2>&1 || echo "report failed"
cp "$OUT/device.txt" "$OUT/cuda_tests.log" "$OUT/natten_probe.txt" "$RUN_DIR/" 2>/dev/null
tar czf "$OUT/gpu_sweep.tgz" -C "$(dirname "$RUN_DIR")" "$(basename "$RUN_DIR")"
