"""Aligner files: our safetensors, the official .pth layout, conversion, and every way a file can be wrong."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thinkdiff_core import AlignerSpec, ThinkDiffAligner, convert_official, load_aligner, read_metadata, save_aligner
from thinkdiff_core.checkpoints import spec_from_state_dict
from thinkdiff_core.errors import CheckpointError, UnsafeCheckpointError

ROOT = Path(__file__).resolve().parents[1]


def random_aligner(input_dim=37, output_dim=48, variant="lvlm", seed=0) -> ThinkDiffAligner:
    torch.manual_seed(seed)
    aligner = ThinkDiffAligner(AlignerSpec(variant, input_dim, output_dim, source_model="tiny", num_tokens=9))
    with torch.no_grad():
        aligner.norm.weight.uniform_(0.5, 2.0)
    return aligner


def official_checkpoint(aligner: ThinkDiffAligner) -> dict:
    """What the official trainer saves (recipe section 3): model state minus frozen params, plus trainer state."""
    state = aligner.state_dict()
    model = {
        "mm_projector.0.weight": state["linear_in.weight"].clone(),
        "mm_projector.0.bias": state["linear_in.bias"].clone(),
        "mm_projector.2.weight": state["linear_out.weight"].clone(),
        "mm_projector.2.bias": state["linear_out.bias"].clone(),
        "mm_projector.3.weight": state["norm.weight"].clone(),
        "t5_model.decoder.some_buffer": torch.zeros(3),  # frozen buffers may stay in "model"
    }
    return {
        "model": model,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
        "config": {"run": {"lr": 1e-4}},
        "scaler": None,
        "epoch": 3,
    }


def test_safetensors_round_trip_keeps_weights_and_spec(tmp_path):
    aligner = random_aligner()
    path = save_aligner(aligner, tmp_path / "a.safetensors", extra_metadata={"trained_steps": 12})
    loaded = load_aligner(path)
    assert loaded.spec == aligner.spec
    x = torch.randn(3, 37)
    torch.testing.assert_close(loaded(x), aligner(x))
    meta = read_metadata(path)
    assert meta["variant"] == "lvlm" and meta["input_dim"] == "37" and meta["output_dim"] == "48"
    assert meta["format_version"] == "1" and meta["num_tokens"] == "9" and meta["trained_steps"] == "12"
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_official_pth_loads_like_safetensors_of_same_weights(tmp_path):
    aligner = random_aligner(input_dim=3584, output_dim=4096)
    torch.save(official_checkpoint(aligner), tmp_path / "thinkdiff_lvlm.pth")
    save_aligner(aligner, tmp_path / "same.safetensors")
    official = load_aligner(tmp_path / "thinkdiff_lvlm.pth")
    ours = load_aligner(tmp_path / "same.safetensors")
    assert official.spec.variant == "lvlm" and official.spec.input_dim == 3584
    assert official.spec.source_model == "Qwen/Qwen2-VL-7B-Instruct"
    x = torch.randn(2, 4, 3584)
    assert torch.equal(official(x), ours(x))


def test_official_clip_variant_detected_by_width(tmp_path):
    aligner = random_aligner(input_dim=1408, output_dim=4096, variant="clip")
    checkpoint = official_checkpoint(aligner)
    checkpoint["model"] = {f"module.{k}": v for k, v in checkpoint["model"].items()}  # DDP prefix is stripped
    torch.save(checkpoint, tmp_path / "thinkdiff_clip.pth")
    assert load_aligner(tmp_path / "thinkdiff_clip.pth").spec.variant == "clip"


def test_bare_state_dict_with_unknown_width_needs_variant(tmp_path):
    torch.save(official_checkpoint(random_aligner())["model"], tmp_path / "custom.pth")
    with pytest.raises(CheckpointError, match="Pass variant='lvlm' or 'clip'"):
        load_aligner(tmp_path / "custom.pth")
    assert load_aligner(tmp_path / "custom.pth", variant="clip").spec.variant == "clip"


def test_convert_command_writes_equivalent_safetensors(tmp_path):
    aligner = random_aligner(input_dim=1408, output_dim=64, variant="clip")
    torch.save(official_checkpoint(aligner), tmp_path / "thinkdiff_clip.pth")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "thinkdiff_core",
            "convert",
            str(tmp_path / "thinkdiff_clip.pth"),
            str(tmp_path / "out.safetensors"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    converted = load_aligner(tmp_path / "out.safetensors")
    x = torch.randn(5, 1408)
    assert torch.equal(converted(x), aligner(x))
    assert read_metadata(tmp_path / "out.safetensors")["converted_from"] == "thinkdiff_clip.pth"
    assert "clip" in result.stdout


def test_convert_command_reports_errors_without_traceback(tmp_path, capsys):
    from thinkdiff_core.__main__ import main

    assert main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "o.safetensors")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "does not exist" in error


def test_pickle_that_would_run_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"model": {"mm_projector.0.weight": Payload()}}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="Nothing in it was run"):
        load_aligner(tmp_path / "evil.pth")
    assert not marker.exists()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: None, "does not exist"),
    ],
)
def test_unusable_paths_name_the_problem(tmp_path, make, message):
    path = tmp_path / "aligner.safetensors"
    make(path)
    with pytest.raises(CheckpointError, match=message):
        load_aligner(path)


def test_truncated_safetensors_is_reported_as_corrupt(tmp_path):
    path = save_aligner(random_aligner(), tmp_path / "a.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_aligner(path)


def test_other_model_file_is_not_an_aligner(tmp_path):
    from safetensors.torch import save_file

    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, tmp_path / "flux.safetensors")
    with pytest.raises(CheckpointError, match="is not a ThinkDiff aligner"):
        load_aligner(tmp_path / "flux.safetensors")


def test_inconsistent_shapes_are_reported():
    state = random_aligner().state_dict()
    state["norm.weight"] = torch.ones(7)
    with pytest.raises(CheckpointError, match="norm.weight has shape"):
        spec_from_state_dict(state, {"variant": "lvlm"})


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    save_aligner(random_aligner(), tmp_path / "a.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_load_to_dtype(tmp_path):
    path = save_aligner(random_aligner(), tmp_path / "a.safetensors")
    assert load_aligner(path, dtype=torch.bfloat16).linear_in.weight.dtype == torch.bfloat16


def test_convert_function_returns_path(tmp_path):
    torch.save(official_checkpoint(random_aligner(input_dim=3584, output_dim=32)), tmp_path / "x.pth")
    out = convert_official(tmp_path / "x.pth", tmp_path / "x.safetensors")
    assert out.exists() and read_metadata(out)["variant"] == "lvlm"
