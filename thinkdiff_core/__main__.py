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
import math
import os
import sys
from pathlib import Path

from .checkpoints import convert_official, read_metadata
from .dtypes import DTYPE_CHOICES, torch_dtype
from .errors import OutputPathError, report_cli_error
from .files import same_file, write_atomic, write_text_atomic
from .flux import BASES, DEFAULT_BASE

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
        "--flux",
        required=True,
        help="diffusers folder or cached repo id of the image model (black-forest-labs/FLUX.1-dev; for another "
        "--base, that base's pipeline folder)",
    )
    parser.add_argument(
        "--base",
        default=DEFAULT_BASE,
        choices=list(BASES),
        help="the T5-XXL image model --flux points at (default flux-dev): any of them takes the aligned tokens",
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    parser.add_argument(
        "--cpu-offload", action="store_true", help="keep FLUX parts on the CPU until used (less GPU memory)"
    )
    parser.add_argument(
        "--allow-download", action="store_true", help="download repo ids missing from the cache (never by default)"
    )


def add_generation_arguments(
    parser: argparse.ArgumentParser, size: int, steps: int | None, guidance: float | None = 3.5
) -> None:
    """Sampling flags; defaults are the recipe's (sections 5 and 10) except `size`, `steps` and `guidance`, which the
    caller sets (None: the --base's own default, e.g. flux-schnell 4 steps)."""
    parser.add_argument("--mode", default="thinkdiff", choices=["thinkdiff", "text", "hybrid"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--steps", type=int, default=steps, help="denoising steps (default: the base's, flux-dev 28)")
    parser.add_argument(
        "--guidance",
        type=float,
        default=guidance,
        help="FLUX's distilled guidance, or the other bases' CFG scale (default: the base's, flux-dev 3.5)",
    )
    parser.add_argument("--size", type=int, default=size, help="width and height in pixels (multiple of 16)")
    parser.add_argument("--num-tokens", type=int, default=128, help="VLM tokens to generate (the recipe: 128)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")


def add_generate_parser(commands) -> None:
    generate = commands.add_parser("generate", help="images + text -> VLM -> aligner -> FLUX -> one image")
    add_model_arguments(generate)
    add_generation_arguments(generate, size=1024, steps=None, guidance=None)
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


def check_output_path(path: Path, extensions: dict[str, str], what: str, flag: str) -> None:
    """Before any model loads: the output's extension is one we can write, and its folder exists or can be made and
    is writable. A bad --output must fail in a second, not after minutes of generation."""
    first = next(iter(extensions))
    if path.is_dir():
        raise OutputPathError(
            f"{flag} '{path}' is a folder; give a file name inside it (e.g. {path / ('out' + first)})."
        )
    if path.suffix.lower() not in extensions:
        common = [ext for ext in (".png", ".jpg", ".webp", ".bmp", ".tif", ".safetensors") if ext in extensions]
        raise OutputPathError(
            f"{flag} '{path}': '{path.suffix or '(no extension)'}' is not a known {what} extension; use one of "
            f"{common} (e.g. {path.with_suffix(first).name})."
        )
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(
            f"{flag} '{path}': the folder '{folder}' is not writable{'' if folder.is_dir() else ' (it is a file)'}. "
            f"Choose a folder you can write to."
        )


def check_generate_arguments(args: argparse.Namespace) -> None:
    """Every generate flag whose bad value would otherwise surface only after the models load (or never)."""
    from PIL import Image

    from .errors import PromptError

    if args.size < 16 or args.size % 16:
        suggestion = max(16, args.size // 16 * 16)
        raise PromptError(
            f"--size {args.size}: the image models need a width and height of at least 16 and a multiple of 16; use e.g. "
            f"{suggestion} (the recipe: 1024)."
        )
    if args.size > 4096:
        raise PromptError(f"--size {args.size} is beyond the image models' range (at most 4096 here); use e.g. 1024.")
    if args.steps is not None and args.steps < 1:
        raise PromptError(f"--steps {args.steps}: at least 1 denoising step is needed (the recipe: 28).")
    if args.guidance is not None and (not math.isfinite(args.guidance) or args.guidance < 0):
        raise PromptError(f"--guidance {args.guidance} must be a finite number >= 0 (the recipe: 3.5).")
    extensions = {ext: fmt for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    extensions = {".png": "PNG", **{ext: fmt for ext, fmt in extensions.items() if ext != ".png"}}
    check_output_path(args.output, extensions, "image", "--output")
    for path in args.image:
        if same_file(path, args.output) or same_file(path, args.output.with_suffix(".json")):
            raise OutputPathError(
                f"--output '{args.output}' (or its .json beside it) is the input image '{path}'; writing would "
                f"replace it. Choose another --output."
            )


def read_image(path: Path):
    """An --image file as RGB; an unreadable one is named (PIL's own error says only 'cannot identify')."""
    from PIL import Image, UnidentifiedImageError

    from .errors import PromptError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise PromptError(
            f"input image '{path}' could not be read ({type(error).__name__}: {error}); it is truncated or not an "
            f"image. Give a PNG/JPEG/WebP file."
        ) from error


def run_generate(args: argparse.Namespace) -> None:
    from PIL import Image

    from .errors import PromptError
    from .pipeline import check_device, generate, load_models
    from .prompts import layout_content

    check_generate_arguments(args)
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
    images = [read_image(path) for path in args.image]
    content = layout_content(layout, prompt, images)
    device = check_device(args.device)
    dtype = torch_dtype(args.dtype, device)
    models = load_models(
        args.vlm,
        args.flux,
        aligner=args.aligner if args.mode != "text" else None,
        device=device,
        dtype=dtype,
        allow_download=args.allow_download,
        cpu_offload=args.cpu_offload,
        base=args.base,
    )
    base = BASES[args.base]
    steps = args.steps if args.steps is not None else base.steps
    guidance = args.guidance if args.guidance is not None else base.guidance
    result = generate(
        models,
        content,
        args.mode,
        settings,
        steps=steps,
        guidance=guidance,
        width=args.size,
        height=args.size,
        seed=args.seed,
        add_vision_id=layout == "in-context words",
    )
    image_format = Image.registered_extensions()[args.output.suffix.lower()]
    write_atomic(args.output, lambda tmp: result.image.save(tmp, format=image_format))
    record = {
        "mode": args.mode,
        "layout": layout,
        "prompt": prompt,
        "images": [str(path) for path in args.image],
        "description": result.text,
        "base": args.base,
        "seed": args.seed,
        "steps": steps,
        "guidance": guidance,
        "size": args.size,
        "num_tokens": args.num_tokens,
        "timings_s": {key: round(value, 4) for key, value in result.timings.items()},
    }
    write_text_atomic(args.output.with_suffix(".json"), json.dumps(record, indent=2))
    cond = result.conditioning[0][0]
    print(
        f"wrote {args.output} ({result.image.width}x{result.image.height}), mode {args.mode}, {args.base} tokens {tuple(cond.shape)}"
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
        if args.command in ("convert", "extract-vision"):
            check_output_path(Path(args.dst), {".safetensors": "safetensors"}, "output", args.command)
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
    except Exception as error:  # a ThinkDiffError names its own fix; a library's error is translated (no traceback)
        return report_cli_error(error)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
