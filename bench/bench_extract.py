"""Benchmark: batched feature extraction (the training precompute) against plain batched `generate`, same process, same
inputs.

    python bench/bench_extract.py --tiny                     # tiny stand-in on CPU in seconds (CI runs this)
    python bench/bench_extract.py --device cuda              # Qwen2-VL-7B shapes, random bf16 weights, 32 x (image + text)

Each row is one picture and a caption-length instruction (different lengths, so rows are left-padded as in real
extraction); every row generates exactly --num-tokens tokens greedily, so both paths do the same work. The reference is
`generate` on the batch (no hidden states at all: the cheapest plain call); ours is `encode_with_vlm` on the batch,
the call train/extract_features.py makes, which returns the features too. Prints one JSON object: device, versions,
shapes, median times, generated tokens/s for each, the ratio, peak memory and whether the greedy tokens are identical.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench_common import (
    add_engine_arguments,
    build_vlm,
    cold_compile_caches,
    environment,
    fast_options,
    peak_memory,
    timed,
)
from thinkdiff_core import GenerationSettings, encode_with_vlm, standin
from thinkdiff_core.generation import generate_kwargs
from thinkdiff_core.prompts import chat_messages, interleaved_content
from thinkdiff_core.vlm import model_inputs

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white")
SHAPES = ("square", "circle", "triangle")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny stand-in model (CPU-friendly)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="rows per batch (default 32; 4 with --tiny)")
    parser.add_argument("--num-tokens", type=int, default=None, help="tokens per row (default 64; 8 with --tiny)")
    parser.add_argument("--image-size", type=int, default=448, help="side of each picture (448 -> 256 vision tokens)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--layers", type=int, default=None, help="fewer layers (a quick check of the real-shape path, not a timing)"
    )
    add_engine_arguments(parser)
    return parser.parse_args(argv)


def conversations(batch: int, size: int) -> list[list[dict]]:
    rows = []
    for index in range(batch):
        colour, shape = COLOURS[index % len(COLOURS)], SHAPES[index % len(SHAPES)]
        picture = standin.draw_shape_image(colour, shape, size=size)
        words = " ".join(["describe the picture in detail"] * (1 + index % 4))  # rows of different lengths
        rows.append(chat_messages(interleaved_content(f"<image> {words}", [picture])))
    return rows


def reference_generate(vlm, rows, settings: GenerationSettings):
    """Plain batched generate: the same prompts, processors and token count, no states kept."""
    inputs = model_inputs(vlm, rows)
    with torch.inference_mode():
        out = vlm.model.generate(**inputs, **generate_kwargs(vlm, settings, None))
    return out[:, inputs["input_ids"].shape[1] :]


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch or (4 if args.tiny else 32)
    num_tokens = args.num_tokens or (8 if args.tiny else 64)
    cold_compile_caches(args)
    with tempfile.TemporaryDirectory() as workdir:
        vlm = build_vlm(args.tiny, device, Path(workdir), args.layers)
    vlm.fast_options = fast_options(args)
    rows = conversations(batch, 56 if args.tiny else args.image_size)
    settings = GenerationSettings(num_tokens=num_tokens, greedy=True)

    ours_call = lambda: encode_with_vlm(vlm, rows, settings, engine="fast")  # noqa: E731
    reference_call = lambda: reference_generate(vlm, rows, settings)  # noqa: E731
    reference_call()
    first_call_s, _ = timed(ours_call, device, 1)
    ours_time, ours = timed(ours_call, device, args.repeats)
    reference_time, reference_ids = timed(reference_call, device, args.repeats)
    generated = batch * num_tokens
    result = {
        "bench": "extract",
        **environment(device),
        "shapes": {
            "model": "tiny stand-in"
            if args.tiny
            else f"Qwen2-VL-7B (random bf16 weights{f', {args.layers} layers' if args.layers else ''})",
            "batch": batch,
            "prompt_tokens_padded": int(ours.prompt_ids.shape[1]),
            "generated_tokens_per_row": num_tokens,
        },
        "engine": {"compiled": vlm.fast_decoder().compiled, "captured_graphs": vlm.fast_decoder().captured_graphs},
        "reference": "batched generate (no hidden states)",
        "reference_s": round(reference_time, 4),
        "ours_s": round(ours_time, 4),
        "first_call_s": round(first_call_s, 3),
        "reference_tokens_per_s": round(generated / reference_time, 1),
        "ours_tokens_per_s": round(generated / ours_time, 1),
        "speedup": round(reference_time / ours_time, 3),
        "peak_memory_gib": {"reference": peak_memory(device, reference_call), "ours": peak_memory(device, ours_call)},
        "tokens_identical": bool(torch.equal(ours.generated_ids.cpu(), reference_ids.cpu())),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
