"""Offline stand-in run of the whole ThinkDiff-LVLM graph through the node classes.

STAND-IN: every model here is tiny and random, built locally in seconds (see thinkdiff_core/standin.py). The VLM's
text is gibberish and the image is noise. What the run shows is the real plumbing, the same node code ComfyUI runs:

    LoadImage x2 -> ThinkDiff VLM Encode (in-context words "red / blue / green") -> ThinkDiff Conditioning
    ThinkDiff VLM Loader, ThinkDiff Aligner Loader, empty-prompt FLUX text encode -> (base conditioning)
    -> FLUX sampler (here diffusers' FluxPipeline on a tiny transformer) -> PNG

Usage, from the checkout root: python -m scripts.demo [--output-dir demo_output]  (bash scripts/demo.sh does this in the
project's venv; run as a module so that the pack's `nodes` package imports, as it does inside ComfyUI)
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from PIL import Image, ImageDraw

from nodes import NODE_CLASS_MAPPINGS, comfy_adapter
from thinkdiff_core import flux, save_aligner, standin
from thinkdiff_core.images import image_tensor_from_pil


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("demo_output"))
    parser.add_argument("--num-tokens", type=int, default=16, help="VLM tokens to generate (128 with real models)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (1024 with real models)")
    parser.add_argument("--steps", type=int, default=2, help="FLUX steps (28 with real models)")
    return parser.parse_args(argv)


def build_standin_models(models_root: Path) -> None:
    """Write the stand-in VLM folder and aligner file where the loader nodes look for them."""
    vlm_dir = models_root / "LLM" / "tiny-qwen2-vl-STANDIN"
    if not (vlm_dir / "config.json").exists():
        standin.build_qwen2vl(vlm_dir)
    aligner_file = models_root / "thinkdiff" / "tiny-lvlm-aligner-STANDIN.safetensors"
    if not aligner_file.exists():
        save_aligner(standin.build_aligner(input_dim=64, output_dim=4096), aligner_file)


def summary_card(inputs: list[Image.Image], words: list[str], output: Image.Image, text: str) -> Image.Image:
    """One picture of the run: the in-context inputs, the query word, the output, and the stand-in label."""
    tile = 128
    card = Image.new("RGB", (tile * (len(inputs) + 2) + 40, tile + 110), "white")
    draw = ImageDraw.Draw(card)
    draw.text((10, 6), standin.STANDIN_LABEL, fill="red")
    for index, (image, word) in enumerate(zip(inputs, words)):
        card.paste(image.resize((tile, tile)), (10 + index * tile, 30))
        draw.text((14 + index * tile, 32 + tile), f"{word}:", fill="black")
    query_x = 10 + len(inputs) * tile
    draw.text((query_x + 10, 30 + tile // 2), f"{words[-1]}: ?  ->", fill="black")
    card.paste(output.resize((tile, tile), Image.Resampling.NEAREST), (query_x + tile, 30))
    draw.text((10, 60 + tile), f"VLM text: {text[:90]!r}", fill="gray")
    return card


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    print(f"== {standin.STANDIN_LABEL} ==")
    models_root = args.output_dir / "models"
    build_standin_models(models_root)
    comfy_adapter.set_models_root(models_root)

    words = ["red", "blue", "green"]
    images = [standin.draw_shape_image("red"), standin.draw_shape_image("blue")]

    (vlm,) = NODE_CLASS_MAPPINGS["ThinkDiffVLMLoader"]().load(
        model="tiny-qwen2-vl-STANDIN", dtype="float32", device="cpu", attention="sdpa", trust_remote_code=False
    )
    encoded = NODE_CLASS_MAPPINGS["ThinkDiffVLMEncode"]().encode(
        vlm=vlm,
        prompt="\n".join(words),
        layout="in-context words",
        num_tokens=args.num_tokens,
        seed=42,
        temperature=0.6,
        top_p=0.9,
        greedy=False,
        keep_model_loaded=False,
        image_1=image_tensor_from_pil(images[0]),
        image_2=image_tensor_from_pil(images[1]),
    )
    features, text = encoded["result"]
    (aligner,) = NODE_CLASS_MAPPINGS["ThinkDiffAlignerLoader"]().load(aligner="tiny-lvlm-aligner-STANDIN.safetensors")

    pipe = standin.build_flux_pipeline()
    base = flux.empty_prompt_conditioning(pipe)  # stands in for CLIPTextEncodeFlux("") in the ComfyUI workflow
    (conditioning,) = NODE_CLASS_MAPPINGS["ThinkDiffConditioning"]().apply(
        aligner=aligner, features=features, mode="replace", strength=1.0, conditioning=base
    )
    image = flux.render(pipe, conditioning, steps=args.steps, seed=42, width=args.size, height=args.size)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    image_path = args.output_dir / "thinkdiff_standin.png"
    image.save(image_path)
    (args.output_dir / "thinkdiff_standin.txt").write_text(f"{standin.STANDIN_LABEL}\n\nVLM text:\n{text}\n")
    card_path = args.output_dir / "thinkdiff_standin_card.png"
    summary_card(images, words, image, text).save(card_path)

    cond = conditioning[0][0]
    print(f"VLM features:        {tuple(features.hidden_states.shape)}  (batch, generated tokens, VLM width)")
    print(
        f"FLUX conditioning:   {tuple(cond.shape)}  pooled {tuple(conditioning[0][1]['pooled_output'].shape)}  guidance {conditioning[0][1]['guidance']}"
    )
    print(f"VLM generated text:  {text!r}")
    print(f"image:               {image_path}  ({image.width}x{image.height})")
    print(f"summary card:        {card_path}")
    print(f"done in {time.perf_counter() - started:.1f} s  -- {standin.STANDIN_LABEL}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
