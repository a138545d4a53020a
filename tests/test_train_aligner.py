"""train/train_aligner.py run in-process on the tiny configs: loss, export, resume, ablations, the CLIP variant."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from conftest import tiny_overrides
from thinkdiff_core import load_aligner, read_metadata
from thinkdiff_train import train_aligner
from thinkdiff_train.checkpointing import ResumeError
from thinkdiff_train.config import load_config
from thinkdiff_train.objective import load_frozen_t5


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(data_dir, run_dir, max_steps: int, resume=False, config="train/configs/tiny.yaml", **overrides):
    """train_aligner.train on a tiny config pointed at the tiny data; returns the trained aligner."""
    settings = tiny_overrides(data_dir, **overrides)[1::2]  # the KEY=VALUE after each --set
    loaded = load_config(config, settings, output_dir=str(run_dir), max_steps=max_steps)
    return train_aligner.train(loaded, resume=resume)


@pytest.fixture(scope="module")
def lvlm_run(tiny_train_data, tiny_features, tmp_path_factory):
    """30 steps of the tiny LVLM recipe (validation every 10), with TensorBoard on."""
    run_dir = tmp_path_factory.mktemp("lvlm_run")
    aligner = train(tiny_train_data, run_dir, 30, report_to="tensorboard")
    return run_dir, aligner


def test_loss_goes_down_on_the_tiny_config(lvlm_run):
    run_dir, _ = lvlm_run
    rows = metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(1, 31))
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.3, (first, last)
    val = [row["val_loss"] for row in rows if "val_loss" in row]
    assert len(val) == 3 and val[-1] < val[0]
    assert (run_dir / "loss_curve.png").stat().st_size > 1000
    assert list(run_dir.rglob("events.out.tfevents.*")), "no TensorBoard log"


def test_exported_file_loads_in_core_and_node_with_the_same_outputs(lvlm_run, tmp_path):
    from nodes import comfy_adapter
    from nodes.loaders import ThinkDiffAlignerLoader

    run_dir, trained = lvlm_run
    features = torch.randn(2, 7, 64)
    expected = trained(features)
    assert read_metadata(run_dir / "aligner.safetensors")["variant"] == "lvlm"
    torch.testing.assert_close(load_aligner(run_dir / "aligner.safetensors")(features), expected, rtol=0, atol=0)
    (tmp_path / "thinkdiff").mkdir()
    shutil.copy(run_dir / "aligner.safetensors", tmp_path / "thinkdiff" / "tiny-trained.safetensors")
    comfy_adapter.set_models_root(tmp_path)
    try:
        (node_aligner,) = ThinkDiffAlignerLoader().load("tiny-trained.safetensors")
    finally:
        comfy_adapter.set_models_root(None)
    torch.testing.assert_close(node_aligner.model(features), expected, rtol=0, atol=0)
    # The last checkpoint holds the same weights as the exported file.
    checkpoint = sorted((run_dir / "checkpoints").glob("checkpoint-*"))[-1]
    assert json.loads((checkpoint / "progress.json").read_text())["step"] == 30


def test_resume_gives_the_same_loss_curve(lvlm_run, tiny_train_data, tmp_path):
    run_dir, trained = lvlm_run
    train(tiny_train_data, tmp_path, 10)
    resumed = train(tiny_train_data, tmp_path, 30, resume=True)
    expected, got = metrics(run_dir), metrics(tmp_path)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for want, have in zip(expected, got):
        assert have["loss"] == pytest.approx(want["loss"], abs=1e-6), want["step"]
        assert have.get("val_loss", 0) == pytest.approx(want.get("val_loss", 0), abs=1e-6)
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6)


def test_resume_without_a_checkpoint_says_what_exists(tiny_train_data, tmp_path):
    (tmp_path / "checkpoints" / ".tmp-checkpoint-0000010").mkdir(parents=True)  # an interrupted save does not count
    with pytest.raises(ResumeError, match=r"no complete checkpoint.*removed as incomplete.*\.tmp-checkpoint-0000010"):
        train(tiny_train_data, tmp_path, 2, resume=True)


def test_a_finished_run_is_not_overwritten_without_resume(lvlm_run, tiny_train_data):
    run_dir, _ = lvlm_run
    with pytest.raises(ResumeError, match="--resume"):
        train(tiny_train_data, run_dir, 2)


@pytest.mark.parametrize("ablation", [{"split": False}, {"feature_source": "input"}, {"norm_init": "ones"}])
def test_ablation_switches_train(tiny_train_data, tiny_features, tmp_path, ablation):
    train(tiny_train_data, tmp_path, 2, **ablation, eval_every=0)
    rows = metrics(tmp_path)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert json.loads(read_metadata(tmp_path / "aligner.safetensors")["training"]) == {
        **{"split": True, "feature_source": "generated", "norm_init": "t5"},
        **ablation,
    }


def test_norm_starts_from_the_t5_encoder_final_norm(tiny_train_data):
    t5, _ = load_frozen_t5(str(tiny_train_data / "models" / "t5"), torch.float32)
    final_norm = t5.encoder.final_layer_norm.weight
    config = load_config("train/configs/tiny.yaml")
    aligner = train_aligner.build_aligner(config, 64, t5, "tiny")
    torch.testing.assert_close(aligner.norm.weight, final_norm)
    ablated = dataclasses.replace(config, norm_init="ones")
    assert torch.equal(train_aligner.build_aligner(ablated, 64, t5, "tiny").norm.weight, torch.ones(32))


def test_clip_variant_trains_skips_bad_images_and_exports(tiny_train_data, tmp_path):
    trained = train(tiny_train_data, tmp_path, 12, config="train/configs/tiny_clip.yaml")
    rows = metrics(tmp_path)
    assert rows[-1]["skipped_images"] >= 1  # the corrupt picture in shard 0 was met, counted, and training went on
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert "val_loss" in rows[-1]
    loaded = load_aligner(tmp_path / "aligner.safetensors")
    assert loaded.spec.variant == "clip" and loaded.spec.input_dim == 48 and loaded.spec.output_dim == 32
    tokens = torch.randn(1, 65, 48)
    torch.testing.assert_close(loaded(tokens), trained(tokens), rtol=0, atol=0)


def test_the_command_line_reports_a_fixable_error_in_one_line_and_returns_2(tiny_train_data, tmp_path, capsys):
    argv = ["--config", "train/configs/tiny.yaml", "--output-dir", str(tmp_path), "--resume"]
    assert train_aligner.main([*argv, *tiny_overrides(tiny_train_data)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --resume: no complete checkpoint") and "Run without --resume" in line
