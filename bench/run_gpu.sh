#!/usr/bin/env bash
# Every GPU benchmark in one go, for a session with a GPU: one JSON line per bench in results.jsonl, logs beside it.
#
#   bash bench/run_gpu.sh                 # all three; writes bench/results/ (or $OUT/ where the device tool sets it)
#   bash bench/run_gpu.sh vlm extract     # some of them (vlm, extract, train): under a 10-minute limit per command,
#   bash bench/run_gpu.sh train           # two calls leave room for slow first compiles
#   python bench/report.py bench/results/results.jsonl    # the tables for BENCHMARKS.md
#
# Each bench runs in its own process with its own time limit (seconds below), so one failure still leaves the others'
# figures; each process's log is kept beside results.jsonl.
# Random weights of the real shapes: nothing is downloaded. Uses $PY, else the python3 on PATH.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
results="${OUT:-bench/results}"
mkdir -p "$results"
PY="${PY:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$results/device.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$results/device.txt"
benches=("$@")
[[ ${#benches[@]} -gt 0 ]] || benches=(vlm extract train)
for name in "${benches[@]}"; do
    case "$name" in
        vlm) script=bench_vlm_encode limit=240 ;;
        extract) script=bench_extract limit=150 ;;
        train) script=bench_train_step limit=300 ;;
        *) echo "unknown bench '$name': choose from vlm, extract, train" >&2; exit 2 ;;
    esac
    started=$(date +%s)
    if timeout "$limit" "$PY" "bench/$script.py" --device cuda >"$results/$script.out" 2>"$results/$script.log"; then
        tail -n 1 "$results/$script.out" >>"$results/results.jsonl"
    else
        echo "{\"bench\": \"$script\", \"failed\": true, \"exit\": $?}" >>"$results/results.jsonl"
        tail -n 20 "$results/$script.log"
    fi
    echo "$script: $(( $(date +%s) - started )) s"
done
cat "$results/results.jsonl"
