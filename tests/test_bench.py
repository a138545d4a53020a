"""The bench scripts keep working: run with --tiny on CPU, they print one JSON object with the expected fields."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vlm_encode_bench_tiny(capsys):
    result = load("bench_vlm_encode").main(["--tiny", "--device", "cpu", "--num-tokens", "4", "--repeats", "1"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == result
    assert result["tokens_identical"] and result["max_abs_feature_difference"] < 1e-5
    assert result["shapes"]["generated_tokens"] == 4 and result["shapes"]["images"] == 2
    assert result["reference_s"] > 0 and result["ours_s"] > 0 and result["speedup"] > 0
