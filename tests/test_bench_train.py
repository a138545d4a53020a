"""bench/bench_train_step.py keeps working: with --tiny on a CPU it prints one JSON object whose numbers agree."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load("bench_train_step")


def test_train_step_bench_tiny(bench, capsys):
    result = bench.main(["--tiny", "--device", "cpu", "--repeats", "1", "--mix-batches", "1"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == result
    assert result["shapes"]["batch_size"] == 32 and result["shapes"]["aligner"] == "64 -> 32"
    assert result["measured_peak_tflops"] > 0 and "Backward" in result["flops_formula"]
    assert result["ours"]["compile"] is False  # auto: compiled on a GPU only
    for path in ("reference", "ours"):
        numbers = result[path]
        assert numbers["step_ms"] > 0 and numbers["samples_per_s"] > 0 and 0 < numbers["fraction_of_peak"]
    # fp32 on a CPU: the gathered loss is the reference step's loss, its gradient the reference gradient
    assert result["loss_abs_difference"] < 1e-5 and result["gradient_relative_difference"] < 1e-5
    mix = result["length_mix"]
    bucketed, unbucketed = mix["bucketed"]["padding"], mix["unbucketed"]["padding"]
    for side in ("encoder", "decoder", "work"):
        assert bucketed[side] <= 0.10 and bucketed[side] < unbucketed[side], side
    assert mix["padding_fraction_bucketed"] == bucketed["work"] <= 0.10
    assert (
        mix["bucketed"]["ours"]["new_graphs_while_timed"] == 0 and mix["unbucketed"]["reference"]["samples_per_s"] > 0
    )
    assert result["projection"]["hours_for_3_2m_samples"] > 0 and result["projection"]["recipe_samples"] == 3_200_000


def test_report_renders_a_gpu_record_of_this_bench(bench, capsys, tmp_path):
    """bench/report.py reads the figures it checks against the issue's bars from this bench's JSON."""
    record = bench.main(["--tiny", "--device", "cpu", "--repeats", "1", "--mix-batches", "1"])
    capsys.readouterr()
    gpu = {**record, "device": "NVIDIA H100 80GB HBM3", "shapes": {**record["shapes"], "model": "flan-T5-XXL decoder"}}
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(gpu) + "\n")
    table = load("report").main([str(results)])
    rows = [line for line in table.splitlines() if line.startswith("| ") and "figure" not in line]
    assert len(rows) == 6 and all(" | None | " not in row for row in rows), table


def test_flop_count_reproduces_the_reference_measurement(bench):
    """One H100 step at batch 32, 64 + 64 tokens through the flan-T5-XXL decoder was measured at 204 ms = 33% and
    101 ms = 66% of 785 TFLOP/s: the bench's count must give those fractions."""
    flops = bench.batch_flops([(64, 64)] * 32, bench.FLAN_T5_XXL, bench.VLM_WIDTH)
    assert flops / 0.204 / 785e12 == pytest.approx(0.33, abs=0.005)
    assert flops / 0.101 / 785e12 == pytest.approx(0.66, abs=0.005)


def test_recipe_mix_lengths_are_the_recipes(bench):
    mix = bench.recipe_length_mix(4096, seed=0)
    prefixes, targets = zip(*mix)
    assert min(prefixes) == 1 and max(prefixes) == 128
    assert min(targets) >= 1 and max(targets) == 128
    assert sum(target == 128 for target in targets) > len(mix) / 3  # long answers: many targets hit the cap
