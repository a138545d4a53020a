"""Judging generated outputs: one row per prompt (missing image = wrong row), a per-task summary.

Files (under {out}/evals/{judge}/{mode}/shot_{k}/): task_{t}_rows.csv (one row per prompt, then a SUMMARY row, as
the benchmark's task_{t}_summary.csv) and, one level up, {out}/evals/{judge}/summary.csv (one line per mode, shot and
task; the report reads it).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from .benchmark import CobsatPrompt, Task
from .judges import Judge
from .runner import WorkItem

logger = logging.getLogger(__name__)

ROW_FIELDS = [
    "file_path",
    "exists",
    "ground_truth_attribute",
    "ground_truth_object",
    "true_label_attribute",
    "true_label_object",
    "answer_attribute",
    "answer_object",
    "check_attribute",
    "check_object",
    "check_textual",
    "check_visual",
    "correct",
]
SUMMARY_FIELDS = [
    "judge",
    "mode",
    "shot",
    "task_id",
    "task",
    "rows",
    "missing",
    "accuracy",
    "attribute_accuracy",
    "object_accuracy",
    "textual_accuracy",
    "visual_accuracy",
]


def judge_row(judge: Judge, task: Task, prompt: CobsatPrompt, image_path: Path) -> dict:
    """One row of the benchmark's table for one prompt's output."""
    attribute, obj = prompt.target_attribute_and_object
    row = {
        "file_path": str(image_path),
        "ground_truth_attribute": attribute,
        "ground_truth_object": obj,
        "true_label_attribute": task.attribute_items.index(attribute) + 1,
        "true_label_object": task.object_items.index(obj) + 1,
        "exists": image_path.is_file(),
    }
    if row["exists"]:
        with Image.open(image_path) as image:
            verdict = judge.judge(image.convert("RGB"), task, truth=(attribute, obj))
        row.update(answer_attribute=verdict.attribute, answer_object=verdict.object, **verdict.extra)
    else:
        row.update(answer_attribute=-1, answer_object=-1)
    row["check_attribute"] = row["answer_attribute"] == row["true_label_attribute"]
    row["check_object"] = row["answer_object"] == row["true_label_object"]
    # textual = the part the text gave (x), visual = the part inferred from the images (theta).
    row["check_textual"] = row["check_object"] if task.x_is_object else row["check_attribute"]
    row["check_visual"] = row["check_attribute"] if task.x_is_object else row["check_object"]
    row["correct"] = row["check_attribute"] and row["check_object"]
    return row


def summarize(rows: Sequence[dict]) -> dict[str, float | int]:
    count = len(rows)
    mean = lambda key: sum(bool(row[key]) for row in rows) / count if count else 0.0  # noqa: E731
    return {
        "rows": count,
        "missing": sum(not row["exists"] for row in rows),
        "accuracy": mean("correct"),
        "attribute_accuracy": mean("check_attribute"),
        "object_accuracy": mean("check_object"),
        "textual_accuracy": mean("check_textual"),
        "visual_accuracy": mean("check_visual"),
    }


def write_rows(path: Path, rows: Sequence[dict], summary: dict) -> None:
    fields = ROW_FIELDS + sorted({key for row in rows for key in row} - set(ROW_FIELDS))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        writer.writerow(
            {
                "file_path": "SUMMARY",
                "exists": summary["rows"] - summary["missing"],
                "correct": f"{summary['accuracy']:.4f}",
                "check_attribute": f"{summary['attribute_accuracy']:.4f}",
                "check_object": f"{summary['object_accuracy']:.4f}",
                "check_textual": f"{summary['textual_accuracy']:.4f}",
                "check_visual": f"{summary['visual_accuracy']:.4f}",
            }
        )


def judge_items(judge: Judge, items: Sequence[WorkItem], out_dir: Path, progress: bool = True) -> list[dict]:
    """Judge every item, write the per-task row files, merge into {out}/evals/{judge}/summary.csv; return summaries."""
    from tqdm.auto import tqdm

    groups: dict[tuple[str, int, int], list[dict]] = {}
    for item in tqdm(items, desc=f"judge {judge.name}", disable=not progress):
        prompt = item.prompt
        row = judge_row(judge, prompt.task, prompt, item.output_stem(out_dir).with_suffix(".jpg"))
        groups.setdefault((item.mode, prompt.shot, prompt.task.task_id), []).append(row)
    eval_dir = out_dir / "evals" / judge.name
    summaries = []
    for (mode, shot, task_id), rows in groups.items():
        summary = summarize(rows)
        write_rows(eval_dir / mode / f"shot_{shot}" / f"task_{task_id}_rows.csv", rows, summary)
        task = items_task(items, task_id)
        summaries.append(
            {"judge": judge.name, "mode": mode, "shot": shot, "task_id": task_id, "task": task.name, **summary}
        )
    merge_summary(eval_dir / "summary.csv", summaries)
    return summaries


def items_task(items: Sequence[WorkItem], task_id: int) -> Task:
    return next(item.prompt.task for item in items if item.prompt.task.task_id == task_id)


def read_summary(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def merge_summary(path: Path, summaries: Sequence[dict]) -> None:
    """Replace the lines of the same (mode, shot, task) in summary.csv, keep the others (other runs' results)."""
    keys = {(s["mode"], str(s["shot"]), str(s["task_id"])) for s in summaries}
    kept = [row for row in read_summary(path) if (row["mode"], row["shot"], row["task_id"]) not in keys]
    lines = kept + [
        {key: (f"{value:.4f}" if isinstance(value, float) else value) for key, value in s.items()} for s in summaries
    ]
    lines.sort(key=lambda row: (row["mode"], int(row["shot"]), int(row["task_id"])))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows(lines)
