"""Render bench results (the JSON lines the bench scripts print) as the Markdown tables of BENCHMARKS.md.

    python bench/report.py bench/results/results.jsonl > /tmp/tables.md
    python bench/report.py --summary bench/results > snippet.md    # what run_gpu.sh ends with: also summary.json

Each figure is checked against the issue's bar where one exists. Results from a CPU or from --tiny models are refused
as tables: they prove the scripts run, not how fast anything is. The summary names them as such instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

# (label, how to read it from a result, the bar as text, whether the value meets it)
Check = tuple[str, Callable[[dict], object], str, Callable[[object], bool] | None]

CHECKS: dict[str, list[Check]] = {
    "vlm_encode": [
        ("128 tokens, 2 pictures: reference (plain generate)", lambda r: f"{r['reference_s']:.3f} s", "", None),
        ("128 tokens, 2 pictures: ours", lambda r: r["ours_s"], "<= 0.8 s", lambda v: v <= 0.8),
        ("speed-up over the reference", lambda r: r["speedup"], ">= 4.5x", lambda v: v >= 4.5),
        ("greedy tokens identical (free-running)", lambda r: r["tokens_identical"], "yes", bool),
        ("first differing token (free-running)", lambda r: r["first_divergence"], "", None),
        (
            "greedy picks agree up to bf16 near-ties (teacher forced)",
            lambda r: r["greedy_agrees_up_to_near_ties"],
            "yes",
            bool,
        ),
        ("features within bf16 tolerance (teacher forced)", lambda r: r["features_within_bf16_tolerance"], "yes", bool),
        ("first call (compile + capture + encode)", lambda r: r["first_call_s"], "<= 30 s", lambda v: v <= 30),
        ("recompiled for a new prompt length", lambda r: r["recompiled_for_new_length"], "no", lambda v: v is False),
        (
            "peak memory, ours (GiB)",
            lambda r: r["peak_memory_gib"]["ours"],
            "<= 18",
            lambda v: v is not None and v <= 18,
        ),
        (
            "left allocated after release (GiB)",
            lambda r: r["allocated_after_release_gib"],
            "<= 1",
            lambda v: v is not None and v <= 1,
        ),
    ],
    "extract": [
        ("generated tokens/s: reference (batched generate)", lambda r: r["reference_tokens_per_s"], "", None),
        ("generated tokens/s: ours", lambda r: r["ours_tokens_per_s"], ">= 3000", lambda v: v >= 3000),
        ("speed-up over the reference", lambda r: r["speedup"], ">= 3x", lambda v: v >= 3),
        ("greedy tokens identical", lambda r: r["tokens_identical"], "yes", bool),
    ],
    "train_step": [
        ("reference shapes: reference step (ms)", lambda r: r["reference"]["step_ms"], "", None),
        ("reference shapes: our step (ms)", lambda r: r["ours"]["step_ms"], "", None),
        (
            "fraction of the measured bf16 matrix peak, ours",
            lambda r: r["ours"]["fraction_of_peak"],
            ">= 0.75",
            lambda v: v >= 0.75,
        ),
        ("loss difference, ours vs plain step", lambda r: r["loss_abs_difference"], "within tolerance", None),
        (
            "padding on the recipe's length mix, ours",
            lambda r: r["length_mix"]["padding_fraction_bucketed"],
            "<= 0.10",
            lambda v: v <= 0.10,
        ),
        (
            "3.2 M samples on one card (hours)",
            lambda r: r["projection"]["hours_for_3_2m_samples"],
            "<= 2.5",
            lambda v: v <= 2.5,
        ),
    ],
}

COMMANDS = {
    "vlm_encode": "python bench/bench_vlm_encode.py --device cuda",
    "extract": "python bench/bench_extract.py --device cuda",
    "train_step": "python bench/bench_train_step.py --device cuda",
}


def render(results: list[dict]) -> str:
    lines = []
    for result in results:
        name = result.get("bench")
        if name not in CHECKS:
            continue
        if result.get("device") == "cpu" or "tiny" in str(result.get("shapes", {}).get("model", "")):
            raise SystemExit(f"refusing to report a CPU or --tiny result of {name}: it says nothing about speed")
        versions = ", ".join(f"{k} {v}" for k, v in result.get("versions", {}).items())
        lines += [
            f"### {name}: {result['device']}, {result.get('date', '?')}",
            "",
            f"`{COMMANDS[name]}` ({versions}; shapes: {json.dumps(result.get('shapes', {}))})",
            "",
            "| figure | value | bar | met |",
            "|---|---|---|---|",
        ]
        for label, read, bar, meets in CHECKS[name]:
            try:
                value = read(result)
            except (KeyError, TypeError):
                value = None
            verdict = "" if meets is None or value is None else ("yes" if meets(value) else "**no**")
            lines.append(f"| {label} | {value} | {bar} | {verdict} |")
        lines.append("")
    return "\n".join(lines)


def read_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().startswith("{")]


def is_speed_figure(result: dict) -> bool:
    return result.get("device") not in (None, "cpu") and "tiny" not in str(result.get("shapes", {}).get("model", ""))


def summarize(folder: Path) -> tuple[dict, str]:
    """run_gpu.sh's output folder -> (summary.json's content, the BENCHMARKS.md snippet): device, driver, versions,
    what ran and how long, the GPU check's verdict and table, and the benches' tables (GPU records only)."""
    check_path = folder / "gpu_check.json"
    check = json.loads(check_path.read_text()) if check_path.is_file() else {}
    benches: dict[str, dict] = {}
    for result in read_lines(folder / "results.jsonl"):  # the last record of each bench counts
        benches[result.get("bench", "?")] = result
    benches.pop("gpu_check", None)
    device_text = (folder / "device.txt").read_text().strip() if (folder / "device.txt").is_file() else ""
    summary = {
        "device": check.get("device"),
        "driver": check.get("driver"),
        "versions": check.get("versions", {}),
        "date": check.get("date"),
        "device_txt": device_text,
        "steps": read_lines(folder / "status.jsonl"),
        "gpu_check": {
            "complete": check.get("complete", False),
            "mode": check.get("mode"),
            "verdict": check.get("verdict"),
            "contenders": check.get("contenders", {}),
            "steps": check.get("steps", {}),
        },
        "benches": benches,
    }
    versions = ", ".join(f"{k} {v}" for k, v in summary["versions"].items() if v)
    lines = [
        f"## Results: {summary['device'] or '?'}, driver {summary['driver'] or 'n/a'}, {summary['date'] or '?'}",
        "",
        f"Versions: {versions or '?'}. Machine (device.txt): {' / '.join(device_text.splitlines()) or 'n/a'}",
        "",
        "| step | status | seconds | limit s |",
        "|---|---|---|---|",
    ]
    for step in summary["steps"]:
        status = step.get("status", "?") + (f" ({step['reason']})" if step.get("reason") else "")
        lines.append(f"| {step.get('step')} | {status} | {step.get('seconds', '')} | {step.get('limit_s', '')} |")
    lines.append("")
    if (folder / "gpu_check.md").is_file():
        lines += [(folder / "gpu_check.md").read_text().strip(), ""]
    speed = [result for result in benches.values() if result.get("bench") in CHECKS and is_speed_figure(result)]
    rest = sorted(name for name, result in benches.items() if result not in speed)
    if speed:
        lines.append(render(speed))
    if rest:
        lines.append(f"Not tabled (failed, or a CPU / --tiny record that is no speed figure): {', '.join(rest)}.")
    text = "\n".join(lines).rstrip() + "\n"
    (folder / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary, text


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="?", help="JSON lines, one bench result each")
    parser.add_argument("--summary", type=Path, metavar="FOLDER", help="run_gpu.sh's output folder: summary + snippet")
    args = parser.parse_args(argv)
    if args.summary is not None:
        text = summarize(args.summary)[1]
    elif args.results is not None:
        text = render(read_lines(args.results))
    else:
        parser.error("give a results.jsonl file or --summary FOLDER")
    sys.stdout.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
