"""Render bench results (the JSON lines the bench scripts print) as the Markdown tables of BENCHMARKS.md.

    python bench/report.py bench/results/results.jsonl > /tmp/tables.md

Each figure is checked against the issue's bar where one exists. Results from a CPU or from --tiny models are refused:
they prove the scripts run, not how fast anything is.
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


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="JSON lines, one bench result each")
    args = parser.parse_args(argv)
    results = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip().startswith("{")]
    text = render(results)
    sys.stdout.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
