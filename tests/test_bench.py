"""The bench scripts keep working: run with --tiny on CPU, they print one JSON object with the expected fields.

The timings on a CPU mean nothing; what is checked is that each script runs both paths on the same inputs and that
our path agrees with the reference (identical greedy tokens, equal features), so a GPU session only has to run them.
"""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def printed_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_vlm_encode_bench_tiny(capsys):
    result = load("bench_vlm_encode").main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--num-tokens",
            "4",
            "--repeats",
            "1",
            "--compile",
            "on",
            "--compile-backend",
            "aot_eager",
        ]
    )
    assert printed_json(capsys) == result
    assert result["tokens_identical"] and result["max_abs_feature_difference"] < 1e-5
    assert result["features_within_bf16_tolerance"]
    assert result["shapes"]["generated_tokens"] == 4 and result["shapes"]["images"] == 2
    assert result["shapes"]["longer_prompt_tokens"] > result["shapes"]["prompt_tokens"]
    assert result["engine"]["compiled"] and not result["engine"]["cuda_graphs"]
    assert result["recompiled_for_new_length"] is False
    assert min(result["reference_s"], result["ours_s"], result["generate_with_hook_s"], result["first_call_s"]) > 0
    assert result["speedup"] > 0 and result["device"] and result["versions"]["torch"]


def test_extract_bench_tiny(capsys):
    result = load("bench_extract").main(
        ["--tiny", "--device", "cpu", "--batch", "3", "--num-tokens", "4", "--repeats", "1"]
    )
    assert printed_json(capsys) == result
    assert result["tokens_identical"]
    assert result["shapes"]["batch"] == 3 and result["shapes"]["generated_tokens_per_row"] == 4
    assert result["ours_tokens_per_s"] > 0 and result["reference_tokens_per_s"] > 0


def test_report_refuses_cpu_figures_and_checks_the_bars(capsys, tmp_path):
    report = load("report")
    tiny = load("bench_extract").main(
        ["--tiny", "--device", "cpu", "--batch", "2", "--num-tokens", "2", "--repeats", "1"]
    )
    capsys.readouterr()
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(tiny) + "\n")
    with pytest.raises(SystemExit, match="refusing to report a CPU or --tiny result"):
        report.main([str(results)])
    # The same record as if a GPU had produced it: the bars are applied (3000 tokens/s, 3x).
    gpu = {**tiny, "device": "NVIDIA H100 80GB HBM3", "shapes": {**tiny["shapes"], "model": "Qwen2-VL-7B"}}
    results.write_text(json.dumps({**gpu, "ours_tokens_per_s": 3500.0, "speedup": 2.5}) + "\n")
    table = report.main([str(results)])
    assert "| generated tokens/s: ours | 3500.0 | >= 3000 | yes |" in table
    assert "| speed-up over the reference | 2.5 | >= 3x | **no** |" in table


def test_report_summary_names_the_device_and_tables_only_gpu_records(tmp_path):
    """run_gpu.sh ends with `report.py --summary`: summary.json and a snippet naming device, driver and versions, with
    tables for GPU records and a note for CPU / --tiny ones."""
    gpu = {
        "bench": "extract",
        "device": "NVIDIA H200",
        "shapes": {"model": "Qwen2-VL-7B"},
        "ours_tokens_per_s": 3100.0,
        "speedup": 3.2,
        "tokens_identical": True,
    }
    cpu = {"bench": "vlm_encode", "device": "cpu", "shapes": {"model": "tiny stand-in"}}
    (tmp_path / "results.jsonl").write_text(json.dumps(cpu) + "\n" + json.dumps(gpu) + "\n")
    (tmp_path / "status.jsonl").write_text(json.dumps({"step": "bench_extract", "status": "ok", "seconds": 80}) + "\n")
    check = {
        "device": "NVIDIA H200",
        "driver": "580.1",
        "date": "2026-12-03",
        "versions": {"torch": "2.11", "diffusers": "0.42"},
    }
    (tmp_path / "gpu_check.json").write_text(json.dumps(check))
    (tmp_path / "gpu_check.md").write_text("### GPU check: NVIDIA H200\n\n**Verdict:** keep")
    text = load("report").main(["--summary", str(tmp_path)])
    assert text.startswith("## Results: NVIDIA H200, driver 580.1, 2026-12-03")
    assert "torch 2.11, diffusers 0.42" in text and "**Verdict:** keep" in text
    assert "| generated tokens/s: ours | 3100.0 | >= 3000 | yes |" in text and "| bench_extract | ok | 80 |" in text
    assert "Not tabled (failed, or a CPU / --tiny record that is no speed figure): vlm_encode." in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["driver"] == "580.1" and summary["benches"]["extract"]["speedup"] == 3.2
