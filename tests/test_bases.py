"""The other T5-XXL bases outside ComfyUI: tiny diffusers SD3, Chroma and PixArt-Sigma pipelines (random weights,
real conditioning widths) drawing from aligned tokens, the base check when loading, and the CoBSAT mini loop with
--base sd3.5-large."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

from thinkdiff_core import VlmFeatures, align_features, flux, standin
from thinkdiff_core.conditioning import build_conditioning, sd3_clip_tokens
from thinkdiff_core.errors import ModelFolderError
from thinkdiff_core.eval import cobsat
from thinkdiff_core.eval.benchmark import TASKS, prompts
from thinkdiff_core.pipeline import load_base_pipeline
from thinkdiff_core.standin_bases import build_base_pipeline, save_base_pipeline

SIZE = 32


@pytest.fixture(scope="module")
def aligned():
    """Real aligner output (64 -> 4096) of 9 random VLM states."""
    torch.manual_seed(2)
    features = VlmFeatures(
        hidden_states=torch.randn(1, 9, 64),
        generated_ids=torch.zeros(1, 9, dtype=torch.long),
        lengths=torch.tensor([9]),
        prompt_ids=torch.zeros(1, 3, dtype=torch.long),
        text=["x"],
        source_model="tiny-qwen2-vl",
    )
    return align_features(standin.build_aligner(input_dim=64, output_dim=4096), features)


@pytest.fixture(scope="module")
def sd3_pipe():
    return build_base_pipeline("sd3")


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return save_base_pipeline("sd3", tmp_path_factory.mktemp("sd3") / "tiny-sd3")


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.tensor(list(image.getdata()), dtype=torch.float32)


def test_sd3_empty_prompt_has_comfyuis_layout(sd3_pipe):
    """diffusers' SD3 encoders give what ComfyUI's CLIPTextEncodeSD3 gives: 77 CLIP-L/G tokens zero-padded past
    2048 columns, then T5; pooled (1, 2048)."""
    ((cond, options),) = flux.empty_prompt_conditioning(sd3_pipe, max_sequence_length=13)
    assert cond.shape == (1, 77 + 13, 4096) and options["pooled_output"].shape == (1, 2048)
    assert sd3_clip_tokens(cond) == 77 and cond[:, :77, :2048].abs().sum() > 0 and cond[:, 77:, 2048:].abs().sum() > 0


def test_tiny_sd3_draws_from_aligned_tokens(sd3_pipe, aligned):
    base = flux.empty_prompt_conditioning(sd3_pipe)
    conditioning = build_conditioning(aligned, base=base, mode="replace")
    cond, options = conditioning[0]
    assert cond.shape == (1, 77 + 9, 4096) and torch.equal(cond[:, :77], base[0][0][:, :77])
    assert torch.equal(cond[:, 77:], aligned) and options["pooled_output"] is base[0][1]["pooled_output"]
    image = flux.render(sd3_pipe, conditioning, steps=2, seed=0, width=SIZE, height=SIZE, guidance=3.5)
    assert image.size == (SIZE, SIZE) and len(set(image.getdata())) > 10
    again = flux.render(sd3_pipe, conditioning, steps=2, seed=0, width=SIZE, height=SIZE, guidance=3.5)
    assert torch.equal(pixels(image), pixels(again))  # seeded
    other = build_conditioning(-aligned, base=base, mode="replace")  # the tokens reach the MMDiT
    changed = flux.render(sd3_pipe, other, steps=2, seed=0, width=SIZE, height=SIZE, guidance=3.5)
    assert not torch.equal(pixels(image), pixels(changed))


@pytest.mark.parametrize("kind", ["chroma", "pixart"])
def test_t5_only_bases_draw_from_aligned_tokens(kind, aligned):
    pipe = build_base_pipeline(kind)
    ((cond, options),) = flux.empty_prompt_conditioning(pipe)
    assert options["pooled_output"] is None and options["attention_mask"].shape == cond.shape[:2]
    conditioning = build_conditioning(aligned, base=flux.text_conditioning(pipe, "a red car", None, 16), mode="append")
    cond, options = conditioning[0]
    assert cond.shape[1] == options["attention_mask"].shape[1] and options["attention_mask"][:, -9:].eq(1).all()
    image = flux.render(pipe, conditioning, steps=2, seed=0, width=SIZE, height=SIZE)
    assert image.size == (SIZE, SIZE) and len(set(image.getdata())) > 10


def test_loading_checks_the_pipeline_is_the_bases(sd3_dir, tiny_flux_dir):
    with pytest.raises(ModelFolderError, match="holds a FluxPipeline, but base 'sd3.5-large'.*--base flux-dev"):
        load_base_pipeline(tiny_flux_dir, "sd3.5-large", dtype=torch.float32)
    with pytest.raises(ModelFolderError, match="unknown base 'sd4'; choose one of flux-dev"):
        load_base_pipeline(sd3_dir, "sd4")
    pipe = load_base_pipeline(sd3_dir, "sd3.5-large", dtype=torch.float32)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    # schnell and dev share FluxPipeline: the transformer's guidance_embeds tells them apart (the stand-in is dev-like)
    with pytest.raises(ModelFolderError, match="guidance-distilled FLUX.1 .* samples as schnell: pass --base flux-dev"):
        load_base_pipeline(tiny_flux_dir, "flux-schnell", dtype=torch.float32)


def test_cobsat_mini_loop_on_sd35(tmp_path, models_root, sd3_dir, cobsat_mini_root, capsys):
    out = tmp_path / "out-sd35"
    run = [
        "run", "--data-root", str(cobsat_mini_root), "--out", str(out), "--vlm", str(models_root / "LLM" / "tiny-qwen2-vl"),
        "--aligner", str(models_root / "thinkdiff" / "tiny-lvlm.safetensors"), "--flux", str(sd3_dir),
        "--base", "sd3.5-large", "--tasks", "1", "--shots", "2", "--size", str(SIZE), "--steps", "1",
        "--num-tokens", "3", "--device", "cpu", "--dtype", "float32", "--no-progress", "--limit", "1",
        "--modes", "thinkdiff", "text", "hybrid",
    ]  # fmt: skip
    assert cobsat.main(run) == 0
    (prompt,) = prompts(TASKS[1], 2, limit=1)
    for mode in ("thinkdiff", "text", "hybrid"):
        stem = out / mode / "shot_2" / "task_1" / prompt.save_name
        assert json.loads(stem.with_suffix(".json").read_text())["base"] == "sd3.5-large"
        assert Image.open(stem.with_suffix(".jpg")).size == (SIZE, SIZE)
    judge = ["judge", "--out", str(out), "--tasks", "1", "--shots", "2", "--limit", "1", "--judge", "pixel"]
    assert cobsat.main([*judge, "--modes", "thinkdiff", "text", "hybrid", "--no-progress"]) == 0
    with (out / "evals" / "pixel" / "summary.csv").open() as handle:
        assert {row["mode"] for row in csv.DictReader(handle)} == {"thinkdiff", "text", "hybrid"}
    assert cobsat.main(["report", "--out", str(out), "--note", "STAND-IN, sd3.5-large"]) == 0
    assert (out / "report" / "cobsat_report.md").is_file()
    capsys.readouterr()
    assert cobsat.main([*run, "--base", "flux-dev"]) == 2  # resuming another base's run is refused
    assert "already holds images made with base 'sd3.5-large'" in capsys.readouterr().err
    run[run.index("--out") + 1] = str(tmp_path / "out-flux")
    assert cobsat.main([*run, "--base", "flux-dev"]) == 2  # an SD3 folder is not a FLUX base
    assert "holds a StableDiffusion3Pipeline, but base 'flux-dev' needs a FluxPipeline" in capsys.readouterr().err


def test_generate_cli_takes_base(tmp_path, models_root, sd3_dir, shape_images, capsys):
    """`python -m thinkdiff_core generate --base sd3.5-large`: the base's own defaults (28 steps, CFG 3.5) unless
    given, the base recorded beside the image; an SD3 folder under the default base is refused by name."""
    from thinkdiff_core.__main__ import main

    shape_images[0].save(image := tmp_path / "in.png")
    output = tmp_path / "sd3.png"
    args = [
        "generate", "--vlm", str(models_root / "LLM" / "tiny-qwen2-vl"),
        "--aligner", str(models_root / "thinkdiff" / "tiny-lvlm.safetensors"), "--flux", str(sd3_dir),
        "--image", str(image), "--prompt", "a picture like <image>", "--layout", "free text", "--size", "32",
        "--num-tokens", "4", "--device", "cpu", "--output", str(output),
    ]  # fmt: skip
    assert main([*args, "--base", "sd3.5-large", "--steps", "2"]) == 0
    record = json.loads(output.with_suffix(".json").read_text())
    assert (record["base"], record["steps"], record["guidance"]) == ("sd3.5-large", 2, 3.5)
    assert Image.open(output).size == (32, 32)
    assert "sd3.5-large tokens" in capsys.readouterr().out
    assert main(args) == 2  # default base flux-dev: the folder holds a StableDiffusion3Pipeline
    assert "StableDiffusion3Pipeline" in capsys.readouterr().err
