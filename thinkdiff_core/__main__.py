"""Command line: `python -m thinkdiff_core convert SRC.pth DST.safetensors [--variant lvlm|clip]`."""

from __future__ import annotations

import argparse
import sys

from .checkpoints import convert_official, read_metadata
from .errors import ThinkDiffError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m thinkdiff_core", description="ThinkDiff utilities")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert an official thinkdiff_*.pth aligner to safetensors")
    convert.add_argument("src", help="official checkpoint, e.g. thinkdiff_lvlm.pth")
    convert.add_argument("dst", help="output .safetensors path (e.g. ComfyUI/models/thinkdiff/thinkdiff_lvlm.safetensors)")
    convert.add_argument("--variant", choices=["lvlm", "clip"], help="only for files whose width is not a released one")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            out = convert_official(args.src, args.dst, variant=args.variant)
            meta = read_metadata(out)
            print(f"wrote {out}: {meta['variant']} aligner {meta['input_dim']} -> {meta['output_dim']}")
    except ThinkDiffError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
