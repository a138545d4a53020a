"""CoBSAT for ThinkDiff: prompts, generation, judging and the report (see docs/cobsat.md).

    python -m thinkdiff_core.eval.cobsat prompts --task 1 --shot 2 --limit 3
    python -m thinkdiff_core.eval.cobsat make-mini DATA                       # offline stand-in theme (tasks 1, 2)
    accelerate launch -m thinkdiff_core.eval.cobsat run --data-root DATA --out OUT --vlm ... --aligner ... --flux ... \\
        --tasks 1-10 --shots 2 4 --modes thinkdiff text hybrid
    ... run ... --base sd3.5-large --flux stabilityai/stable-diffusion-3.5-large --out OUT-sd35   # cross-model
    python -m thinkdiff_core.eval.cobsat judge --out OUT --judge llava --judge-model llava-hf/llava-1.5-13b-hf
    python -m thinkdiff_core.eval.cobsat report --out OUT
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..dtypes import DTYPE_CHOICES, torch_dtype
from ..errors import PromptError, ThinkDiffError
from ..flux import BASES, DEFAULT_BASE
from ..pipeline import RENDER_MODES, check_device
from .benchmark import SHOTS, TASKS, prompts, task_by_id


def parse_tasks(text: str) -> list[int]:
    """'1-10', '1,2,5' or 'all' -> task ids."""
    if text == "all":
        return list(TASKS)
    ids: list[int] = []
    for part in text.split(","):
        start, _, end = part.partition("-")
        try:
            ids += list(range(int(start), int(end or start) + 1))
        except ValueError:
            raise argparse.ArgumentTypeError(f"tasks must look like '1-10', '1,2' or 'all', got {text!r}") from None
    if not ids or any(task_id not in TASKS for task_id in ids):
        raise argparse.ArgumentTypeError(f"tasks must be within 1..10, got {text!r}")
    return ids


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output root ({out}/{mode}/shot_{k}/task_{t}/...)")
    parser.add_argument("--tasks", type=parse_tasks, default=list(TASKS), help="'1-10' (default), '1,2' or 'all'")
    parser.add_argument("--shots", type=int, nargs="+", default=[2, 4], choices=SHOTS)
    parser.add_argument("--modes", nargs="+", default=["thinkdiff"], choices=RENDER_MODES)
    parser.add_argument(
        "--limit", type=int, default=None, help="only the first N prompts of each task (default all 1000)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def build_parser() -> argparse.ArgumentParser:
    from ..__main__ import add_generation_arguments, add_model_arguments

    parser = argparse.ArgumentParser(
        # the console script's own name (thinkdiff-cobsat), else how `python -m` ran it
        prog=Path(sys.argv[0]).name
        if Path(sys.argv[0]).name.startswith("thinkdiff")
        else "python -m thinkdiff_core.eval.cobsat",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    show = commands.add_parser("prompts", help="print the benchmark's prompts as JSON lines")
    show.add_argument("--task", type=int, required=True, choices=list(TASKS))
    show.add_argument("--shot", type=int, required=True, choices=SHOTS)
    show.add_argument("--limit", type=int, default=None)

    mini = commands.add_parser("make-mini", help="draw the offline mini Color theme (stand-in data for tasks 1, 2)")
    mini.add_argument("data_root", type=Path)
    mini.add_argument("--size", type=int, default=32, help="picture side in pixels")

    run = commands.add_parser("run", help="generate images (resumable; split across `accelerate launch` processes)")
    add_selection_arguments(run)
    run.add_argument(
        "--data-root", type=Path, required=True, help="folder holding color_car/red_car.jpg etc. (CoBSAT datasets/)"
    )
    add_model_arguments(run)
    if "--base" not in run._option_string_actions:  # the shared model arguments may come to define it
        run.add_argument(
            "--base",
            default=DEFAULT_BASE,
            choices=list(BASES),
            help="the T5-XXL image model --flux points at (a diffusers folder of that base): cross-model transfer; "
            "use one --out per base",
        )
    add_generation_arguments(run, size=512, steps=28)

    judge = commands.add_parser("judge", help="score generated images; missing image = wrong row")
    add_selection_arguments(judge)
    judge.add_argument("--judge", default="llava", choices=["llava", "qwen2vl", "clip", "pixel"])
    judge.add_argument(
        "--judge-model", help="local folder or cached repo id (llava-hf/llava-1.5-13b-hf, openai/clip-vit-base-patch32)"
    )
    judge.add_argument("--judge-max-tokens", type=int, default=512, help="MLLM reply length (the benchmark: 512)")
    judge.add_argument("--device", default=None)
    judge.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)

    report = commands.add_parser(
        "report", help="per-task table (Markdown, CSV) beside the paper's numbers, and a bar chart"
    )
    report.add_argument("--out", type=Path, required=True)
    report.add_argument("--report-dir", type=Path, default=None, help="default: {out}/report")
    report.add_argument("--judges", nargs="+", default=None, help="only these judges' results")
    report.add_argument("--title", default="CoBSAT accuracy (ThinkDiff column order)")
    report.add_argument("--note", default="", help="a line printed under the title (e.g. 'STAND-IN RUN')")
    return parser


def command_prompts(args: argparse.Namespace) -> None:
    for prompt in prompts(task_by_id(args.task), args.shot, args.limit):
        print(json.dumps(prompt.to_json()))


def command_run(args: argparse.Namespace) -> None:
    from ..__main__ import generation_settings
    from ..pipeline import load_models
    from .runner import RenderSettings, check_dataset, process_rank, run, work_items

    if args.size % 16:
        raise PromptError(f"--size {args.size} is not a multiple of 16, which the image models need.")
    if any(mode != "text" for mode in args.modes) and not args.aligner:
        raise PromptError(
            "modes thinkdiff and hybrid need --aligner (e.g. thinkdiff_lvlm.pth); only --modes text runs without one."
        )
    settings = generation_settings(args)
    items = work_items(args.tasks, args.shots, args.modes, args.limit)
    check_dataset(args.data_root, items)
    process_index, num_processes, accelerate_device = process_rank()
    device = check_device(args.device) if args.device else accelerate_device
    dtype = torch_dtype(args.dtype, device)
    factory = lambda: load_models(  # noqa: E731
        args.vlm,
        args.flux,
        aligner=args.aligner if any(mode != "text" for mode in args.modes) else None,
        device=device,
        dtype=dtype,
        allow_download=args.allow_download,
        cpu_offload=args.cpu_offload,
        base=args.base,
    )
    render = RenderSettings(size=args.size, steps=args.steps, guidance=args.guidance, seed=args.seed)
    counts = run(
        factory,
        items,
        args.data_root,
        args.out,
        settings,
        render,
        process_index,
        num_processes,
        not args.no_progress,
        base=args.base,
    )
    print(
        f"process {process_index + 1}/{num_processes}: {counts['generated']} generated, {counts['skipped']} already done, of {counts['share']} in its share ({len(items)} in all)"
    )


def command_judge(args: argparse.Namespace) -> None:
    from .judges import load_judge
    from .runner import work_items
    from .score import judge_items

    device = check_device(args.device)
    judge = load_judge(args.judge, args.judge_model, device, torch_dtype(args.dtype, device), args.judge_max_tokens)
    summaries = judge_items(
        judge, work_items(args.tasks, args.shots, args.modes, args.limit), args.out, not args.no_progress
    )
    for summary in summaries:
        print(
            f"{summary['mode']:9s} {summary['shot']}-shot {summary['task']:13s} accuracy {summary['accuracy']:.3f} ({summary['rows']} rows, {summary['missing']} missing)"
        )
    print(f"wrote {args.out / 'evals' / judge.name / 'summary.csv'}")


def command_report(args: argparse.Namespace) -> None:
    from .report import write_report

    paths = write_report(args.out, args.report_dir or args.out / "report", args.title, args.judges, args.note)
    print(Path(paths["markdown"]).read_text())
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "prompts":
            command_prompts(args)
        elif args.command == "make-mini":
            from .mini import make_mini

            print(
                f"wrote the mini Color theme (stand-in data, 100 images) under {make_mini(args.data_root, args.size)}"
            )
        elif args.command == "run":
            command_run(args)
        elif args.command == "judge":
            command_judge(args)
        elif args.command == "report":
            command_report(args)
    except ThinkDiffError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
