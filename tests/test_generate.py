"""Standalone generation: `python -m thinkdiff_core generate` on stand-in folders, the three modes' conditioning,
and model lookup that never downloads silently."""

import json

import pytest
import torch
from PIL import Image

from thinkdiff_core.__main__ import main
from thinkdiff_core.errors import ModelFolderError
from thinkdiff_core.pipeline import load_flux_pipeline, mode_conditioning, resolve_aligner_file, resolve_model_folder


@pytest.fixture(scope="module")
def tiny_pipe(tiny_flux_dir):
    """The stand-in FLUX pipeline loaded back through the local loader."""
    return load_flux_pipeline(tiny_flux_dir, dtype=torch.float32)


def test_mode_conditioning_shapes(tiny_pipe):
    aligned = torch.randn(1, 5, 4096)
    thinkdiff = mode_conditioning(tiny_pipe, aligned, "ignored", "thinkdiff", guidance=3.5)
    text = mode_conditioning(tiny_pipe, None, "a red car", "text")
    hybrid = mode_conditioning(tiny_pipe, aligned, "a red car", "hybrid")
    empty_pooled = tiny_pipe.encode_prompt(prompt="", prompt_2="", max_sequence_length=128)[1]
    text_embeds, text_pooled, _ = tiny_pipe.encode_prompt(
        prompt="a red car", prompt_2="a red car", max_sequence_length=128
    )

    torch.testing.assert_close(thinkdiff[0][0], aligned)  # the paper: aligned tokens only ...
    torch.testing.assert_close(thinkdiff[0][1]["pooled_output"], empty_pooled)  # ... pooled from CLIP-L("")
    assert thinkdiff[0][1]["guidance"] == 3.5
    assert text[0][0].shape == (1, 512, 4096)
    torch.testing.assert_close(text[0][1]["pooled_output"], text_pooled)
    assert hybrid[0][0].shape == (1, 5 + 128, 4096)  # aligned tokens first, then the text's T5 tokens
    torch.testing.assert_close(hybrid[0][0][:, :5], aligned)
    torch.testing.assert_close(hybrid[0][0][:, 5:], text_embeds)
    torch.testing.assert_close(hybrid[0][1]["pooled_output"], text_pooled)
    with pytest.raises(ValueError):
        mode_conditioning(tiny_pipe, aligned, "", "bogus")


def generate_args(models_root, flux_dir, images, output, *extra):
    return [
        "generate", "--vlm", str(models_root / "LLM" / "tiny-qwen2-vl"),
        "--aligner", str(models_root / "thinkdiff" / "tiny-lvlm.safetensors"), "--flux", str(flux_dir),
        *[arg for path in images for arg in ("--image", str(path))], "--size", "32", "--steps", "1",
        "--num-tokens", "4", "--device", "cpu", "--output", str(output), *extra,
    ]  # fmt: skip


def test_generate_cli_on_standin_folders(tmp_path, models_root, tiny_flux_dir, shape_images, capsys):
    images = []
    for index, image in enumerate(shape_images):
        images.append(tmp_path / f"in_{index}.png")
        image.save(images[-1])
    output = tmp_path / "out" / "thinkdiff.png"
    assert (
        main(
            generate_args(models_root, tiny_flux_dir, images, output, "--words", "red", "blue", "green", "--seed", "7")
        )
        == 0
    )
    assert Image.open(output).size == (32, 32)
    record = json.loads(output.with_suffix(".json").read_text())
    assert (
        record["mode"] == "thinkdiff"
        and record["layout"] == "in-context words"
        and record["prompt"] == "red\nblue\ngreen"
    )
    assert "(1, 4, 4096)" in capsys.readouterr().out

    free = tmp_path / "free.png"
    prompt = "Make a picture like <image>, but greener."
    args = generate_args(
        models_root, tiny_flux_dir, images[:1], free, "--prompt", prompt, "--layout", "free text", "--mode", "hybrid"
    )
    assert main(args) == 0
    assert json.loads(free.with_suffix(".json").read_text())["layout"] == "free text"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--words", "red", "green"], "one word per image"),  # 2 images need 3 words
        (["--words", "a", "b", "c", "--size", "30"], "multiple of 16"),
        (["--words", "a", "b", "c", "--temperature", "0"], "--temperature"),
    ],
)
def test_generate_cli_user_errors(tmp_path, models_root, tiny_flux_dir, shape_images, capsys, extra, message):
    images = []
    for index, image in enumerate(shape_images):
        images.append(tmp_path / f"in_{index}.png")
        image.save(images[-1])
    assert main(generate_args(models_root, tiny_flux_dir, images, tmp_path / "x.png", *extra)) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error


def test_missing_models_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFolderError, match="does not exist"):
        resolve_model_folder(tmp_path / "no-such-folder", "FLUX pipeline")
    # a repo id not in the cache: never downloaded, even with allow_download, while HF_HUB_OFFLINE is set
    with pytest.raises(ModelFolderError, match="huggingface-cli download black-forest-labs/FLUX.1-dev"):
        resolve_model_folder("black-forest-labs/FLUX.1-dev", "FLUX pipeline", allow_download=True)
    with pytest.raises(ModelFolderError, match="Mifucius/ThinkDiff"):
        resolve_aligner_file("Mifucius/ThinkDiff/thinkdiff_lvlm.pth")
    # a mistyped relative path under a folder that exists is a path, not a repo id to download
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelFolderError, match="folder 'models/FLUX.1-dev' does not exist"):
        resolve_model_folder("models/FLUX.1-dev", "FLUX pipeline", allow_download=True)
    (tmp_path / "not-a-pipeline").mkdir()
    with pytest.raises(ModelFolderError, match="model_index.json"):
        load_flux_pipeline(tmp_path / "not-a-pipeline")
