"""Shared fixtures: tiny real models built locally once per test session (no downloads, no mocks)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from thinkdiff_core import standin  # noqa: E402
from thinkdiff_core.vlm_loader import load_vlm  # noqa: E402


@pytest.fixture(scope="session")
def models_root(tmp_path_factory):
    """A ComfyUI-like models folder: LLM/tiny-qwen2-vl (hidden 64) and thinkdiff/ with a tiny aligner."""
    from thinkdiff_core import save_aligner

    root = tmp_path_factory.mktemp("models")
    standin.build_qwen2vl(root / "LLM" / "tiny-qwen2-vl")
    save_aligner(standin.build_aligner(input_dim=64, output_dim=4096), root / "thinkdiff" / "tiny-lvlm.safetensors")
    return root


@pytest.fixture(scope="session")
def tiny_qwen2vl_dir(models_root):
    return models_root / "LLM" / "tiny-qwen2-vl"


@pytest.fixture(scope="session")
def tiny_vlm(tiny_qwen2vl_dir):
    """The tiny Qwen2-VL loaded in float32 on CPU (shared: tests must not modify it)."""
    return load_vlm(tiny_qwen2vl_dir, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def shape_images():
    return [standin.draw_shape_image("red"), standin.draw_shape_image("blue", "circle")]


@pytest.fixture
def standalone_models(models_root):
    """Point the node adapter's standalone model folders at the session's models root."""
    from nodes import comfy_adapter

    comfy_adapter.set_models_root(models_root)
    yield models_root
    comfy_adapter.set_models_root(None)


# --- training (train/): tiny T5 / Qwen2-VL / BLIP-2 vision and a shape-picture dataset, built once ----------------


@pytest.fixture(scope="session")
def tiny_train_data(tmp_path_factory):
    """train/make_tiny_data.py's output: models/{t5,qwen2vl,blip2_vision}, shards/train-00{0,1}.tar (20 pictures + 1
    corrupt one), val.jsonl (4 pictures)."""
    from thinkdiff_train.make_tiny_data import write_tiny_data

    return write_tiny_data(tmp_path_factory.mktemp("tiny_train"), train_images=20, val_images=4)


def tiny_overrides(data_dir, **extra) -> list[str]:
    """`--set` arguments pointing the tiny configs at a tiny_train_data folder, plus test-size settings."""
    values = {
        "t5_path": data_dir / "models" / "t5",
        "vlm_path": data_dir / "models" / "qwen2vl",
        "vision_path": data_dir / "models" / "blip2_vision",
        "train_data": data_dir / "shards" / "train-{000..001}.tar",
        "val_data": data_dir / "val.jsonl",
        "features_dir": data_dir / "features",
        "max_new_tokens": 12,
        "samples_per_shard": 8,
        "report_to": "none",
        **extra,
    }
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="session")
def tiny_features(tiny_train_data):
    """LVLM training features of the tiny data (3 shards of at most 8 samples, 12 tokens each at most)."""
    from thinkdiff_train.config import load_config
    from thinkdiff_train.extract_features import extract

    return extract(load_config("train/configs/tiny.yaml", tiny_overrides(tiny_train_data)[1::2]))  # KEY=VALUE only


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """The stand-in FluxPipeline (T5 width 4096, CLIP-L pooled 768) saved as a diffusers folder."""
    return standin.save_flux_pipeline(tmp_path_factory.mktemp("flux") / "tiny-flux")


@pytest.fixture(scope="session")
def cobsat_mini_root(tmp_path_factory):
    """The procedurally drawn mini CoBSAT Color theme (100 pictures of 32 px)."""
    from thinkdiff_core.eval.mini import make_mini

    return make_mini(tmp_path_factory.mktemp("cobsat_mini"))
