"""train/train_aligner.py as a real process: killed and resumed, and under `accelerate launch` with 2 CPU processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import tiny_overrides
from thinkdiff_core import load_aligner
from thinkdiff_train import train_aligner

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train" / "train_aligner.py")


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def environment():
    # One thread per process: the test machines have 2 cores, and 2 processes must not oversubscribe them. No
    # PYTHONPATH: the script finds thinkdiff_core and thinkdiff_train as installed (pip install -e .).
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_run_agrees_with_one_process_and_resumes_after_a_kill(tiny_train_data, tiny_features, tmp_path):
    """A 2-process DDP run (2 samples per process) is killed mid-run with SIGKILL, then resumed by ONE process with
    gradient accumulation 2: the same global batch of 4 in the same order. "Agrees" means: every logged loss, the
    validation losses and the final weights equal those of an uninterrupted 1-process run to float rounding (1e-5;
    DDP averages gradients in another order than accumulation does); no step is logged twice."""
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    settings = tiny_overrides(
        tiny_train_data, batch_size=2, checkpoint_every=5, keep_checkpoints=2, eval_every=10, val_batches=2
    )
    # accelerate launches several CPU processes through torchrun only with --multi_gpu plus ACCELERATE_USE_CPU=1
    # (`--cpu --num_processes 2` starts a single process unless mpirun is set up).
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    process = subprocess.Popen(
        [
            *launch,
            SCRIPT,
            "--config",
            "train/configs/tiny.yaml",
            "--output-dir",
            str(killed),
            "--max-steps",
            "5000",
            *settings,
        ],
        cwd=ROOT,
        env={**environment(), "ACCELERATE_USE_CPU": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            path = killed / "metrics.jsonl"
            if path.is_file() and len(path.read_text().splitlines()) >= 12:
                break
            time.sleep(0.02)
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
    finally:  # the launcher and both workers (torchrun puts them in their own sessions), with no chance to clean up
        launcher = psutil.Process(process.pid)
        started = [*launcher.children(recursive=True), launcher]
        for child in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(signal.SIGKILL)
        process.wait()
        psutil.wait_procs(started, timeout=10)
    before_kill = metrics(killed)
    assert 12 <= len(before_kill) < 30, len(before_kill)

    one_process = [*settings, "--set", "gradient_accumulation_steps=2"]
    reference_argv = ["--config", "train/configs/tiny.yaml", "--output-dir", str(reference), "--max-steps", "30"]
    assert train_aligner.main([*reference_argv, *one_process]) == 0
    resume_exit = train_aligner.main(
        [
            "--config",
            "train/configs/tiny.yaml",
            "--output-dir",
            str(killed),
            "--max-steps",
            "30",
            "--resume",
            *one_process,
        ]
    )
    assert resume_exit == 0
    want = metrics(reference)
    for have, expected in zip(before_kill, want):  # logged by the 2 processes
        assert have["loss"] == pytest.approx(expected["loss"], rel=1e-5), expected["step"]
    got = metrics(killed)
    assert [r["step"] for r in got] == list(range(1, 31))
    for have, expected in zip(got, want):
        assert have["loss"] == pytest.approx(expected["loss"], rel=1e-5), expected["step"]
        assert have.get("val_loss", 0) == pytest.approx(expected.get("val_loss", 0), rel=1e-5)
    single, resumed = load_aligner(reference / "aligner.safetensors"), load_aligner(killed / "aligner.safetensors")
    for key, value in single.state_dict().items():
        assert (resumed.state_dict()[key] - value).abs().max() < 1e-5, key
