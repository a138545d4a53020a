#!/usr/bin/env bash
# The GPU session's one command: the GPU check first, then the benches while the time budget lasts, then a summary.
#
#   bash bench/run_gpu.sh                          # everything into $OUT/ (the device tool sets it), else bench/results/
#   bash bench/run_gpu.sh --out DIR                # into DIR
#   bash bench/run_gpu.sh extract train            # some steps only (gpu_check, extract, train, vlm)
#   TINY=1 PY=.venv/bin/python bash bench/run_gpu.sh gpu_check   # CPU dry run with tiny models (the CI test does this)
#
# Through the device tool: one `run` with timeout_s 600 and the command `bash bench/run_gpu.sh`; the files come
# back from $OUT. BUDGET_S (default 540: about 9 minutes) bounds the whole script: gpu_check gets GPU_CHECK_S (390) of
# it, and each bench after it starts only if its minimum still fits, under the smaller of its own limit and what is
# left. Every step runs in its own process under `timeout`, so a failure or a hang leaves the others' figures.
#
# Writes eight files into the output folder (the device tool brings back at most 8): device.txt, results.jsonl (one
# JSON line per bench), status.jsonl (what ran, how long, why not), gpu_check.json and gpu_check.md, logs.txt (every
# step's output and log, tails), and at the end summary.json (machine-readable: device, driver, versions, the verdict,
# every figure) and BENCHMARKS-snippet.md (for BENCHMARKS.md).
# Random weights of the real shapes: nothing is downloaded. Uses $PY, else the python3 on PATH.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
results="${OUT:-bench/results}"
steps=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) results="$2"; shift 2 ;;
        --out=*) results="${1#--out=}"; shift ;;
        *) steps+=("$1"); shift ;;
    esac
done
[[ ${#steps[@]} -gt 0 ]] || steps=(gpu_check extract train vlm)
mkdir -p "$results"
logs=$(mktemp -d)  # per-step output and logs, gathered into one logs.txt at the end
trap 'rm -rf "$logs"' EXIT
PY="${PY:-python3}"
BUDGET_S="${BUDGET_S:-540}"
GPU_CHECK_S="${GPU_CHECK_S:-390}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"  # nodes/ and bench_common: never installed
started_all=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - started_all))); }

if [[ "${TINY:-0}" == 1 ]]; then
    device_args=(--tiny --device cpu)
    check_args=(--tiny --device cpu --compile-backend aot_eager)
else
    device_args=(--device cuda)
    check_args=(--device cuda)
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$results/device.txt"
else
    echo "no nvidia-smi on this machine" | tee "$results/device.txt"
fi
"$PY" -c "from importlib.metadata import version as v; print(*(f'{p} {v(p)}' for p in ('torch', 'transformers', 'diffusers')))" \
    2>&1 | tee -a "$results/device.txt"

for name in "${steps[@]}"; do
    # limit: the most a step may take; needs: the least worth starting it with
    case "$name" in
        gpu_check) script=gpu_check limit=$GPU_CHECK_S needs=120 ;;
        extract) script=bench_extract limit=150 needs=120 ;;
        train) script=bench_train_step limit=300 needs=240 ;;
        vlm) script=bench_vlm_encode limit=240 needs=150 ;;  # mostly covered by gpu_check
        *) echo "unknown step '$name': choose from gpu_check, extract, train, vlm" >&2; exit 2 ;;
    esac
    [[ "${TINY:-0}" == 1 ]] && needs=1
    available=$(( $(left) - 5 ))
    if (( available < needs )); then
        echo "$script: skipped ($available s left of the ${BUDGET_S} s budget, needs $needs s)"
        echo "{\"step\": \"$script\", \"status\": \"skipped\", \"reason\": \"$available s left of the budget, needs $needs s\"}" >>"$results/status.jsonl"
        continue
    fi
    (( limit > available )) && limit=$available
    if [[ "$script" == gpu_check ]]; then
        command=("$PY" bench/gpu_check.py "${check_args[@]}" --out "$results" --deadline $((limit - 25)))
    else
        command=("$PY" "bench/$script.py" "${device_args[@]}")
    fi
    started=$(date +%s)
    timeout -k 10 "$limit" "${command[@]}" >"$logs/$script.out" 2>"$logs/$script.log"
    status=$?
    seconds=$(( $(date +%s) - started ))
    last=$(tail -n 1 "$logs/$script.out" 2>/dev/null)
    if [[ $status -eq 0 && "$last" == "{"* ]]; then
        echo "$last" >>"$results/results.jsonl"
        outcome=ok
    else
        outcome=$([[ $status -eq 124 || $status -eq 137 ]] && echo "timed out" || echo failed)
        echo "{\"bench\": \"$script\", \"failed\": true, \"exit\": $status}" >>"$results/results.jsonl"
        tail -n 20 "$logs/$script.log"
    fi
    echo "{\"step\": \"$script\", \"status\": \"$outcome\", \"exit\": $status, \"seconds\": $seconds, \"limit_s\": $limit}" >>"$results/status.jsonl"
    echo "$script: $outcome in $seconds s (limit $limit s)"
    grep -h '^\[gpu_check\]' "$logs/$script.out" 2>/dev/null | tail -n 12
done

"$PY" bench/report.py --summary "$results" >"$results/BENCHMARKS-snippet.md" 2>"$logs/report.log" \
    || echo "report failed: see logs.txt"
for file in "$logs"/*; do  # the last 256 kB of each, so logs.txt stays far under the 16 MiB a file may bring back
    printf '\n===== %s =====\n' "$(basename "$file")"
    tail -c 262144 "$file"
done >"$results/logs.txt"
cat "$results/BENCHMARKS-snippet.md"
echo "total: $(( $(date +%s) - started_all )) s of the ${BUDGET_S} s budget; files in $results"
