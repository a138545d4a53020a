"""Shared fixtures: tiny real models built locally once per test session (no downloads, no mocks)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from thinkdiff_core import standin  # noqa: E402
from thinkdiff_core.vlm import load_vlm  # noqa: E402


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
