"""Training and feature extraction under real faults: SIGKILL at random points, and a write that really fails.

Each killed run is a real process (`python train/...`), killed with SIGKILL (no chance to clean up) while it works;
reference and finishing runs go through the same scripts' main() in-process (imports are paid once). Processes keep
the default thread count, so in-process and subprocess runs compute alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from thinkdiff_train import extract_features, train_aligner

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train" / "train_aligner.py")
EXTRACT = str(ROOT / "train" / "extract_features.py")
SEED = int(os.environ.get("THINKDIFF_FAULT_SEED", "20261127"))  # kill points are random but reproducible


def environment():
    return {**os.environ, "HF_HUB_OFFLINE": "1"}  # no PYTHONPATH: the scripts run on the editable install


def lines_written(run_dir: Path) -> int:
    """Complete lines of metrics.jsonl so far, read while the run may be writing one (the kill condition)."""
    path = run_dir / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run(script: str, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def kill_when(script: str, args: list[str], ready, timeout: float = 120.0) -> None:
    """Start the script and SIGKILL it as soon as ready() is true."""
    process = subprocess.Popen(
        [sys.executable, script, *args], cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + timeout
    try:
        while not ready():
            assert process.poll() is None, f"finished before the kill point: {process.stderr.read().decode()[-2000:]}"
            assert time.time() < deadline, "kill point not reached in time"
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def checkpoints_are_whole(checkpoint_dir: Path) -> list[int]:
    """Every folder named checkpoint-N is complete; returns their steps."""
    steps = []
    for folder in sorted(checkpoint_dir.glob("checkpoint-*")):
        progress = folder / "progress.json"
        assert progress.is_file(), f"{folder.name} has no progress.json"
        assert (folder / "model.safetensors").is_file(), f"{folder.name} has no weights"
        steps.append(json.loads(progress.read_text())["step"])
    return steps


def test_training_killed_three_times_resumes_to_the_same_curve(tiny_train_data, tiny_features, tmp_path):
    settings = [
        "--config",
        "train/configs/tiny.yaml",
        "--max-steps",
        "16",
        *tiny_overrides(tiny_train_data, checkpoint_every=3, eval_every=8),
    ]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert train_aligner.main([*settings, "--output-dir", str(reference)]) == 0

    rng = random.Random(SEED)
    kill_steps = [rng.randint(2, 5)]
    kill_steps += [rng.randint(kill_steps[-1] + 3, 10)]
    kill_steps += [rng.randint(kill_steps[-1] + 3, 15)]  # far enough apart that each kill lands in a later run
    for kill_step in kill_steps:
        # a kill before the first checkpoint leaves nothing to resume: then the run starts again, as a user would
        resume = ["--resume"] if checkpoints_are_whole(killed / "checkpoints") else []
        kill_when(TRAIN, [*settings, "--output-dir", str(killed), *resume], lambda: lines_written(killed) >= kill_step)
        checkpoints_are_whole(killed / "checkpoints")
    assert train_aligner.main([*settings, "--output-dir", str(killed), "--resume"]) == 0

    want, got = metrics(reference), metrics(killed)
    assert [row["step"] for row in got] == list(range(1, 17)), f"kill points {kill_steps}"
    for have, expected in zip(got, want):
        assert have["loss"] == pytest.approx(expected["loss"], rel=1e-6, abs=1e-7), (expected["step"], kill_steps)
        assert have.get("val_loss", 0) == pytest.approx(expected.get("val_loss", 0), rel=1e-6, abs=1e-7)
    a, b = load_file(reference / "aligner.safetensors"), load_file(killed / "aligner.safetensors")
    assert all(torch.allclose(a[key], b[key], atol=1e-6) for key in a)


def file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_failed_checkpoint_save_keeps_the_previous_one_and_says_why(tiny_train_data, tiny_features, tmp_path):
    settings = [
        "--config",
        "train/configs/tiny.yaml",
        "--output-dir",
        str(tmp_path),
        *tiny_overrides(tiny_train_data, checkpoint_every=4, report_to="none"),
    ]
    assert train_aligner.main([*settings, "--max-steps", "4"]) == 0
    (step,) = checkpoints_are_whole(tmp_path / "checkpoints")
    previous = next((tmp_path / "checkpoints").glob("checkpoint-*"))
    before = file_digests(previous)
    largest = max(p.stat().st_size for p in previous.iterdir())

    def small_files_only():  # the disk "fills up": no file may grow past half the largest checkpoint file
        limit = largest // 2
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    failed = run(TRAIN, [*settings, "--max-steps", "8", "--resume"], preexec_fn=small_files_only)
    assert failed.returncode == 2  # a ThinkDiffError: one line saying what to do, no traceback
    message = failed.stderr.strip().splitlines()[-1]
    assert message.startswith("error: could not write checkpoint-0000008") and "Free disk space" in message, message
    assert f"the previous checkpoint {previous.name} (step {step}) is intact" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert checkpoints_are_whole(tmp_path / "checkpoints") == [4] and file_digests(previous) == before
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))

    assert train_aligner.main([*settings, "--max-steps", "8", "--resume"]) == 0  # space is back: from step 4 on
    assert checkpoints_are_whole(tmp_path / "checkpoints") == [4, 8]


def read_shards(directory: Path) -> dict:
    shards = {}
    for info_path in sorted(directory.glob("shard-*.json")):
        tensors = load_file(info_path.with_suffix(".safetensors"))
        shards[info_path.stem] = (json.loads(info_path.read_text())["samples"], tensors)
    return shards


def test_extraction_killed_mid_shard_resumes_without_duplicates_or_gaps(tiny_train_data, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    settings = ["--config", "train/configs/tiny.yaml", "--max-shards", "2", *tiny_overrides(tiny_train_data)]
    assert extract_features.main([*settings, "--features-dir", str(reference)]) == 0
    # SIGKILL while the second shard is being generated: the first is finished, the second is not
    kill_when(EXTRACT, [*settings, "--features-dir", str(killed)], lambda: (killed / "shard-000000.json").is_file())
    assert not (killed / "shard-000001.json").exists()
    finished_first = (killed / "shard-000000.safetensors").stat().st_mtime_ns
    assert extract_features.main([*settings, "--features-dir", str(killed)]) == 0
    assert (killed / "shard-000000.safetensors").stat().st_mtime_ns == finished_first  # finished shards are skipped

    want, got = read_shards(reference), read_shards(killed)
    assert list(got) == list(want)
    ids = [
        sample["key"] if isinstance(sample, dict) and "key" in sample else json.dumps(sample, sort_keys=True)
        for samples, _ in got.values()
        for sample in samples
    ]
    assert len(ids) == len(set(ids)), "a sample was stored twice"
    for name, (samples, tensors) in want.items():
        assert got[name][0] == samples, name
        for key, value in tensors.items():
            assert torch.equal(got[name][1][key], value), (name, key)
