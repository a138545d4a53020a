#!/usr/bin/env bash
# Every GPU benchmark in one go, for a session with a GPU: one JSON line per bench in results.jsonl, logs beside it.
#
#   bash bench/run_gpu.sh                 # writes bench/results/ (or $OUT/ where the device tool sets it)
#   python bench/report.py bench/results/results.jsonl    # the tables for BENCHMARKS.md
#
# Each bench runs in its own process with its own time limit, so one failure still leaves the others' figures.
# Random weights of the real shapes: nothing is downloaded. Uses $PY, else the python3 on PATH.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
results="${OUT:-bench/results}"
mkdir -p "$results"
PY="${PY:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$results/device.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$results/device.txt"
for spec in "bench_vlm_encode 200" "bench_extract 150" "bench_train_step 200"; do
    set -- $spec
    started=$(date +%s)
    if timeout "$2" "$PY" "bench/$1.py" --device cuda >"$results/$1.out" 2>"$results/$1.log"; then
        tail -n 1 "$results/$1.out" >>"$results/results.jsonl"
    else
        echo "{\"bench\": \"$1\", \"failed\": true, \"exit\": $?}" >>"$results/results.jsonl"
        tail -n 20 "$results/$1.log"
    fi
    echo "$1: $(( $(date +%s) - started )) s"
done
cat "$results/results.jsonl"
