"""Build everything the tiny training configs need, offline, in a few seconds on a CPU.

    python train/make_tiny_data.py --out tiny_data

Writes under OUT:
  models/t5             tiny flan-T5 stand-in (d_model 32) + tokenizer      -> t5_path
  models/qwen2vl        tiny Qwen2-VL (hidden 64) + processor               -> vlm_path
  models/blip2_vision   tiny BLIP-2 vision tower (224 px, 1 + 16x16 tokens) -> vision_path
  shards/train-000.tar, train-001.tar  webdataset shards of coloured-shape pictures (key.png + key.txt caption);
                                       one deliberately corrupt image shows that bad images are skipped and counted
  val/ + val.jsonl      held-out pictures listed in a JSONL file (the other supported source format)
The models have random weights: a tiny run shows the plumbing and a falling loss, not what ThinkDiff can do.
"""

from __future__ import annotations

import sys

try:  # the first import of the project: where the checkout is not installed, say how to install it
    import thinkdiff_train  # noqa: F401
except ModuleNotFoundError:
    sys.exit(
        f"error: the checkout is not installed in {sys.executable}: run `pip install -e .` in it, or use its .venv"
    )

import argparse
import io
import itertools
import json
import logging
import tarfile
from pathlib import Path

from thinkdiff_core import standin
from thinkdiff_core.errors import report_cli_error

logger = logging.getLogger("thinkdiff.tiny")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="tiny_data", help="output folder (default: tiny_data)")
    parser.add_argument("--train-images", type=int, default=48)
    parser.add_argument("--val-images", type=int, default=8)
    parser.add_argument("--shards", type=int, default=2, help="number of training tar shards")
    parser.add_argument("--corrupt", type=int, default=1, help="corrupt images to put in the first shard")
    parser.add_argument("--skip-models", action="store_true", help="only write the data")
    args = parser.parse_args(argv)
    for flag, value, minimum in (
        ("--train-images", args.train_images, 2),
        ("--val-images", args.val_images, 1),
        ("--shards", args.shards, 1),
        ("--corrupt", args.corrupt, 0),
    ):
        if value < minimum:
            parser.error(f"{flag} must be at least {minimum}, got {value}")
    if args.shards > args.train_images:
        parser.error(f"--shards {args.shards} is more than --train-images {args.train_images}; use fewer shards")
    return args


def shape_pictures(count: int, start: int = 0):
    """(key, PNG bytes, caption) for `count` pictures cycling through colours, shapes and backgrounds."""
    combos = list(itertools.product(standin.SHAPE_COLORS, standin.SHAPE_KINDS, standin.SHAPE_BACKGROUNDS))
    for number in range(start, start + count):
        color, shape, background = combos[(number * 7) % len(combos)]  # stride 7 mixes neighbours up
        buffer = io.BytesIO()
        standin.draw_shape_picture(color, shape, background).save(buffer, format="PNG")
        yield f"{number:06d}", buffer.getvalue(), standin.shape_caption(color, shape, background)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_tiny_data(
    out: str | Path,
    train_images: int = 48,
    val_images: int = 8,
    shards: int = 2,
    corrupt: int = 1,
    skip_models: bool = False,
) -> Path:
    """Write the tiny models and pictures under `out` (see above); return `out` as a Path."""
    out = Path(out)
    if not skip_models:
        standin.build_t5(out / "models" / "t5")
        standin.build_qwen2vl(out / "models" / "qwen2vl")
        standin.build_blip2_vision(out / "models" / "blip2_vision")

    (out / "shards").mkdir(parents=True, exist_ok=True)
    pictures = list(shape_pictures(train_images))
    per_shard = -(-len(pictures) // shards)
    for shard in range(shards):
        members = []
        for key, png, caption in pictures[shard * per_shard : (shard + 1) * per_shard]:
            members += [(f"{key}.png", png), (f"{key}.txt", caption.encode())]
        if shard == 0:
            for number in range(corrupt):  # a truncated PNG: unreadable, must be skipped, never fatal
                members += [
                    (f"corrupt{number}.png", pictures[0][1][:60]),
                    (f"corrupt{number}.txt", b"A broken picture."),
                ]
        write_tar(out / "shards" / f"train-{shard:03d}.tar", members)

    (out / "val").mkdir(exist_ok=True)
    with (out / "val.jsonl").open("w") as handle:
        for key, png, caption in shape_pictures(val_images, start=train_images):
            (out / "val" / f"{key}.png").write_bytes(png)
            handle.write(json.dumps({"image": f"val/{key}.png", "caption": caption}) + "\n")
    logger.info("tiny models and data in %s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 once everything is written; any error prints one line and gives 2."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        write_tiny_data(args.out, args.train_images, args.val_images, args.shards, args.corrupt, args.skip_models)
    except Exception as error:  # a ThinkDiffError names its fix; a library's error is translated, no traceback
        return report_cli_error(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
