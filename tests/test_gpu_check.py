"""bench/gpu_check.py and bench/run_gpu.sh keep working, so that a session with a GPU only has to run them.

The end-to-end test runs run_gpu.sh's CPU dry run (TINY=1): the GPU check with tiny shapes through the node classes,
every contender, the summary. Its timings mean nothing; what is checked is that every contender ran on the same
inputs, that tokens, features and conditioning were compared with the reference, and that the verdict was reached.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = ("generate", "fast", "static_compile", "fast_no_cuda_graphs")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def environment(**extra):
    pythonpath = os.pathsep.join([str(ROOT), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", **extra}


def test_run_gpu_sh_dry_run_on_cpu(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run(
        ["bash", "bench/run_gpu.sh", "--out", str(out), "gpu_check"],
        cwd=ROOT,
        env=environment(TINY="1", PY=sys.executable, BUDGET_S="300", GPU_CHECK_S="240"),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((out / "gpu_check.json").read_text())
    assert record["complete"] and record["steps"]["build"]["status"] == "ok", record["steps"]
    assert record["versions"]["torch"] and record["versions"]["transformers"] and record["date"]
    contenders = record["contenders"]
    for name in CONTENDERS:
        assert record["steps"][name]["status"] == "ok", (name, record["steps"][name])
        figures = contenders[name]
        assert figures["node_s"] > 0 and figures["first_call_s"] > 0 and figures["prefill_ms"] > 0, name
        assert figures["graphs_compiled_while_warm"] == 0, name  # compiled once, in the first call
        # the conditioning node built ComfyUI's FLUX structure: (1, tokens, 4096) + pooled (1, 768) + guidance
        assert figures["conditioning"] == {
            "entries": 1,
            "tokens": [1, 6, 4096],
            "pooled": [1, 768],
            "guidance": 3.5,
            "finite": True,
        }, name
    assert contenders["generate"]["engine_widget"] == "generate" and contenders["fast"]["engine_widget"] == "fast"
    assert contenders["fast"]["fast_engine"]["compiled"]  # aot_eager: the compiled path was traced
    for name in CONTENDERS[1:]:  # float32 tiny models: every engine gives the reference's tokens and features
        figures = contenders[name]
        assert figures["tokens_identical"] and figures["first_divergence"] is None, name
        forced = figures["teacher_forced"]
        assert forced["greedy_disagreements"] == 0 and forced["greedy_agrees_up_to_near_ties"], name
        assert forced["features"]["max_abs"] < 1e-4 and forced["conditioning"]["within_bf16_tolerance"], name
    for name in ("quant_8bit", "quant_4bit"):  # a CPU has no bitsandbytes path: skipped, with the reason
        assert record["steps"][name]["status"] == "skipped" and "CUDA" in contenders[name]["skipped"]
    verdict = record["verdict"]
    assert verdict["binding"] is False and isinstance(verdict["keep_fast_engine"], bool)
    assert verdict["speedup_node"] > 0 and verdict["fast_tokens_match"] and verdict["text"].startswith("not binding")

    summary = json.loads((out / "summary.json").read_text())
    assert summary["gpu_check"]["verdict"] == verdict and summary["versions"] == record["versions"]
    assert [step["status"] for step in summary["steps"]] == ["ok"]
    # the device tool brings back at most 8 files, named in letters, digits, '.', '_' and '-'
    files = sorted(path.name for path in out.rglob("*"))
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files), files
    assert {"summary.json", "BENCHMARKS-snippet.md", "gpu_check.json", "logs.txt"} <= set(files)
    assert "[gpu_check] verdict:" in (out / "logs.txt").read_text()
    snippet = (out / "BENCHMARKS-snippet.md").read_text()
    assert "not a speed figure" in snippet and "**Verdict:** not binding" in snippet
    assert all(f"| {name} |" in snippet for name in CONTENDERS)


def contender(node_s, decode, identical=True, near_ties=True, features_ok=True):
    return {
        "node_s": node_s,
        "decode_tokens_per_s": decode,
        "tokens_identical": identical,
        "teacher_forced": {
            "greedy_agrees_up_to_near_ties": near_ties,
            "features": {"within_bf16_tolerance": features_ok},
        },
    }


def test_decision_rule(gpu_check):
    static = contender(1.6, 80.0)
    keep = gpu_check.decide({"fast": contender(1.0, 160.0), "static_compile": static})
    assert keep["keep_fast_engine"] is True and keep["speedup_node"] == 1.6 and keep["speedup_decode"] == 2.0
    assert keep["binding"] and keep["text"].startswith("keep")
    close = gpu_check.decide({"fast": contender(1.1, 100.0), "static_compile": static})
    assert close["keep_fast_engine"] is False and "1.45x < 1.5x" in close["text"]
    # fast enough, but a real (not near-tie) disagreement: the engine does not stay
    wrong = gpu_check.decide(
        {"fast": contender(0.5, 300.0, identical=False, near_ties=False), "static_compile": static}
    )
    assert wrong["keep_fast_engine"] is False and "do not match" in wrong["text"]
    near = gpu_check.decide({"fast": contender(0.5, 300.0, identical=False), "static_compile": static})
    assert near["keep_fast_engine"] is True  # only bf16 near-ties
    no_static = gpu_check.decide({"fast": contender(0.5, 300.0), "static_compile": {"first_call_s": 9.0}})
    assert no_static["keep_fast_engine"] is None and no_static["text"].startswith("inconclusive")
    no_fast = gpu_check.decide({"fast": {}, "static_compile": static})
    assert no_fast["keep_fast_engine"] is False
    faster_generate = gpu_check.decide(
        {"generate": {"node_s": 1.2}, "fast": contender(1.1, 100.0), "static_compile": static}
    )
    assert faster_generate["faster_transformers_path"] == "generate" and "dynamic cache" in faster_generate["text"]


def test_a_step_past_its_limit_is_recorded_and_the_next_runs(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.STEP_LIMITS, "slow", (0.5, 0.1))
    monkeypatch.setitem(gpu_check.STEP_LIMITS, "broken", (5, 0.1))
    monkeypatch.setitem(gpu_check.STEP_LIMITS, "big", (50, 40))
    run = gpu_check.Run(tmp_path, deadline_s=30)
    started = time.monotonic()
    assert run.step("slow", time.sleep, 10) is None
    assert time.monotonic() - started < 5
    assert run.step("broken", lambda: 1 / 0) is None
    assert run.step("fine", lambda: 42) == 42
    assert run.step("big", lambda: 1) is None  # needs 40 s, 30 are left: not started
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]  # written after every step
    assert steps["slow"]["status"] == "timed out" and "limit" in steps["slow"]["reason"]
    assert steps["broken"]["status"] == "failed" and "ZeroDivisionError" in steps["broken"]["reason"]
    assert steps["fine"]["status"] == "ok" and steps["big"]["status"] == "skipped"
    assert "Steps not run or not completed: slow: timed out" in (tmp_path / "gpu_check.md").read_text()


def test_the_global_deadline_ends_a_hung_run_with_its_partial_figures(tmp_path):
    """A hang the step's alarm cannot break (here: the main thread blocked) still ends at the deadline, JSON kept."""
    code = (
        "import time, gpu_check; run = gpu_check.Run(__import__('pathlib').Path(r'%s'), deadline_s=1.5);"
        "run.step('env', lambda: None); run.watchdog(grace_s=0.2); time.sleep(60)" % tmp_path
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment(), capture_output=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert record["aborted"].startswith("global deadline") and record["steps"]["env"]["status"] == "ok"
