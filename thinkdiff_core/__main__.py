"""Command line.

    python -m thinkdiff_core convert SRC.pth DST.safetensors [--variant lvlm|clip]
    python -m thinkdiff_core generate --vlm Qwen/Qwen2-VL-7B-Instruct --aligner thinkdiff_lvlm.pth \\
        --flux black-forest-labs/FLUX.1-dev --image red_car.jpg --image blue_car.jpg --words red blue green \\
        --mode thinkdiff --output out.png

Models are read from local folders or the Hugging Face cache; nothing is downloaded unless --allow-download is given
for a repo id (and HF_HUB_OFFLINE is unset).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .checkpoints import convert_official, read_metadata
from .dtypes import DTYPE_CHOICES, torch_dtype
from .errors import ThinkDiffError

LAYOUT_ALIASES = {
    "in-context words": "in-context words",
    "words": "in-context words",
    "free text": "free text",
    "free": "free text",
}


def program_name(module_form: str) -> str:
    """The name in usage lines: the console script's own (`thinkdiff`), else how `python -m` ran it."""
    invoked = Path(sys.argv[0]).name
    return invoked if invoked.startswith("thinkdiff") else module_form


def add_convert_parser(commands) -> None:
    convert = commands.add_parser("convert", help="convert an official thinkdiff_*.pth aligner to safetensors")
    convert.add_argument("src", help="official checkpoint, e.g. thinkdiff_lvlm.pth")
    convert.add_argument(
        "dst", help="output .safetensors path (e.g. ComfyUI/models/thinkdiff/thinkdiff_lvlm.safetensors)"
    )
    convert.add_argument("--variant", choices=["lvlm", "clip"], help="only for files whose width is not a released one")


def add_extract_vision_parser(commands) -> None:
    extract = commands.add_parser(
        "extract-vision", help="write just the vision tower of a BLIP-2 folder as one safetensors file (ThinkDiff-CLIP)"
    )
    extract.add_argument("src", help="local BLIP-2 folder, e.g. a download of Salesforce/blip2-flan-t5-xxl")
    extract.add_argument("dst", help="output file, e.g. ComfyUI/models/clip_vision/blip2_vision_tower.safetensors")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--vlm, --aligner, --flux, device and download flags (shared with the CoBSAT runner)."""
    parser.add_argument("--vlm", required=True, help="Qwen2-VL folder or cached repo id (Qwen/Qwen2-VL-7B-Instruct)")
    parser.add_argument(
        "--aligner",
        help="aligner file (.safetensors or thinkdiff_lvlm.pth) or 'Mifucius/ThinkDiff/thinkdiff_lvlm.pth'; not needed for --mode text",
    )
    parser.add_argument(
        "--flux", required=True, help="diffusers FLUX folder or cached repo id (black-forest-labs/FLUX.1-dev)"
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    parser.add_argument(
        "--cpu-offload", action="store_true", help="keep FLUX parts on the CPU until used (less GPU memory)"
    )
    parser.add_argument(
        "--allow-download", action="store_true", help="download repo ids missing from the cache (never by default)"
    )


def add_generation_arguments(parser: argparse.ArgumentParser, size: int, steps: int) -> None:
    """Sampling flags; defaults are the recipe's (sections 5 and 10) except `size` and `steps`, which the caller sets."""
    parser.add_argument("--mode", default="thinkdiff", choices=["thinkdiff", "text", "hybrid"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--size", type=int, default=size, help="width and height in pixels (multiple of 16)")
    parser.add_argument("--num-tokens", type=int, default=128, help="VLM tokens to generate (the recipe: 128)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")


def add_generate_parser(commands) -> None:
    generate = commands.add_parser("generate", help="images + text -> VLM -> aligner -> FLUX -> one image")
    add_model_arguments(generate)
    add_generation_arguments(generate, size=1024, steps=28)
    generate.add_argument("--image", action="append", default=[], type=Path, help="an input image (repeat, in order)")
    text = generate.add_mutually_exclusive_group(required=True)
    text.add_argument(
        "--prompt", help="the text; for 'in-context words' one word per line, for 'free text' <image> marks each image"
    )
    text.add_argument(
        "--words", nargs="+", help="in-context words, one per image plus the query word (sets the layout)"
    )
    generate.add_argument("--layout", default="in-context words", choices=sorted(LAYOUT_ALIASES), help="prompt layout")
    generate.add_argument(
        "--output", type=Path, default=Path("thinkdiff.png"), help="image path; the VLM text goes beside it as .json"
    )


def generation_settings(args: argparse.Namespace):
    """GenerationSettings from the sampling flags; bad values become a PromptError naming the flag."""
    from .errors import PromptError
    from .generation import GenerationSettings

    try:
        return GenerationSettings(
            num_tokens=args.num_tokens,
            greedy=args.greedy,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    except ValueError as error:
        raise PromptError(
            f"{error}; check --num-tokens (>= 1), --temperature (> 0) and --top-p (0 < p <= 1)."
        ) from error


def run_generate(args: argparse.Namespace) -> None:
    from PIL import Image

    from .errors import PromptError
    from .pipeline import default_device, generate, load_models
    from .prompts import layout_content

    if args.size % 16:
        raise PromptError(
            f"--size {args.size} is not a multiple of 16, which FLUX needs; use e.g. {args.size // 16 * 16 or 16}."
        )
    if args.mode != "text" and not args.aligner:
        raise PromptError(
            f"--mode {args.mode} needs --aligner (e.g. thinkdiff_lvlm.pth); only --mode text runs without one."
        )
    for path in args.image:
        if not path.is_file():
            raise PromptError(f"input image '{path}' does not exist; check the --image path.")
    settings = generation_settings(args)
    layout = "in-context words" if args.words else LAYOUT_ALIASES[args.layout]
    prompt = "\n".join(args.words) if args.words else args.prompt.replace("\\n", "\n")
    images = [Image.open(path).convert("RGB") for path in args.image]
    content = layout_content(layout, prompt, images)
    device = args.device or default_device()
    dtype = torch_dtype(args.dtype, device)
    models = load_models(
        args.vlm,
        args.flux,
        aligner=args.aligner if args.mode != "text" else None,
        device=device,
        dtype=dtype,
        allow_download=args.allow_download,
        cpu_offload=args.cpu_offload,
    )
    result = generate(
        models,
        content,
        args.mode,
        settings,
        steps=args.steps,
        guidance=args.guidance,
        width=args.size,
        height=args.size,
        seed=args.seed,
        add_vision_id=layout == "in-context words",
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(args.output)
    record = {
        "mode": args.mode,
        "layout": layout,
        "prompt": prompt,
        "images": [str(path) for path in args.image],
        "description": result.text,
        "seed": args.seed,
        "steps": args.steps,
        "guidance": args.guidance,
        "size": args.size,
        "num_tokens": args.num_tokens,
        "timings_s": {key: round(value, 4) for key, value in result.timings.items()},
    }
    args.output.with_suffix(".json").write_text(json.dumps(record, indent=2))
    cond = result.conditioning[0][0]
    print(
        f"wrote {args.output} ({result.image.width}x{result.image.height}), mode {args.mode}, FLUX tokens {tuple(cond.shape)}"
    )
    print(f"VLM text: {result.text!r}")
    print("timings: " + ", ".join(f"{key} {value:.2f} s" for key, value in result.timings.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("python -m thinkdiff_core"), description="ThinkDiff utilities")
    commands = parser.add_subparsers(dest="command", required=True)
    add_convert_parser(commands)
    add_generate_parser(commands)
    add_extract_vision_parser(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "convert":
            out = convert_official(args.src, args.dst, variant=args.variant)
            meta = read_metadata(out)
            print(f"wrote {out}: {meta['variant']} aligner {meta['input_dim']} -> {meta['output_dim']}")
        elif args.command == "generate":
            run_generate(args)
        elif args.command == "extract-vision":
            from .vision import extract_vision_tower

            out = extract_vision_tower(args.src, args.dst)
            print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    except ThinkDiffError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
