"""The per-task table in ThinkDiff's column order, beside the paper's numbers and the TBDN averages, plus a bar chart.

Our rows: one per (judge, mode, shot) found in {out}/evals/*/summary.csv. Tasks not evaluated show '-'; the mean is over
the evaluated tasks only (its column says how many). Paper rows come from protocol section 9, TBDN from section 10.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .benchmark import COLUMN_ORDER, PAPER_RESULTS, TBDN_AVERAGES
from .score import read_summary


@dataclass
class ReportRow:
    label: str
    shot: int
    values: dict[str, float]  # task name -> accuracy, only tasks that have a value
    source: str  # "this run", "paper", "TBDN (unverified)"
    mean_override: float | None = None  # for rows that publish only an average
    rows_per_task: int | None = None

    @property
    def mean(self) -> float | None:
        if self.mean_override is not None:
            return self.mean_override
        return sum(self.values.values()) / len(self.values) if self.values else None


def collect_rows(out_dir: Path, judges: Sequence[str] | None = None) -> list[ReportRow]:
    """Our rows from every judge's summary.csv, then the published rows for each shot we have."""
    ours: dict[tuple[str, str, int], ReportRow] = {}
    for summary_path in sorted((out_dir / "evals").glob("*/summary.csv")):
        judge = summary_path.parent.name
        if judges and judge not in judges:
            continue
        for line in read_summary(summary_path):
            key = (judge, line["mode"], int(line["shot"]))
            row = ours.setdefault(key, ReportRow(f"{line['mode']} [{judge} judge]", key[2], {}, "this run"))
            row.values[line["task"]] = float(line["accuracy"])
            row.rows_per_task = int(line["rows"])
    rows = sorted(ours.values(), key=lambda row: (row.shot, row.label))
    published = []
    for shot in sorted({row.shot for row in rows}):
        for label, values in PAPER_RESULTS.get(shot, {}).items():
            published.append(ReportRow(label, shot, dict(zip(COLUMN_ORDER, values)), "paper"))
        for label, average in TBDN_AVERAGES.get(shot, {}).items():
            published.append(ReportRow(label, shot, {}, "TBDN (unverified)", mean_override=average))
    return rows + published


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table_lines(rows: Sequence[ReportRow]) -> list[list[str]]:
    header = ["shot", "row", "source", *COLUMN_ORDER, "mean", "tasks", "prompts/task"]
    lines = [header]
    for row in rows:
        tasks = "10" if row.source == "paper" else ("-" if row.mean_override is not None else str(len(row.values)))
        lines.append(
            [
                str(row.shot),
                row.label,
                row.source,
                *(_cell(row.values.get(name)) for name in COLUMN_ORDER),
                _cell(row.mean),
                tasks,
                str(row.rows_per_task) if row.rows_per_task else ("1000" if row.source != "this run" else "-"),
            ]
        )
    return lines


def write_markdown(path: Path, rows: Sequence[ReportRow], title: str, note: str = "") -> None:
    lines = table_lines(rows)
    text = [f"# {title}", ""]
    if note:
        text += [note, ""]
    text.append("| " + " | ".join(lines[0]) + " |")
    text.append("|" + "|".join("---" for _ in lines[0]) + "|")
    text += ["| " + " | ".join(line) + " |" for line in lines[1:]]
    text += [
        "",
        "Mean: over the tasks this run evaluated (column 'tasks'); paper means are over all 10 tasks. TBDN rows publish averages only.",
    ]
    path.write_text("\n".join(text) + "\n")


def write_csv(path: Path, rows: Sequence[ReportRow]) -> None:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(table_lines(rows))


def write_chart(path: Path, rows: Sequence[ReportRow], title: str) -> None:
    """Grouped bars: one group per task (ThinkDiff's order) plus 'mean', one bar per row that has per-task values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*COLUMN_ORDER, "mean"]
    bars = [row for row in rows if row.values and row.label != "SEED-LLaMA"]
    figure, axis = plt.subplots(figsize=(13, 4.2), dpi=100)
    width = 0.8 / max(1, len(bars))
    for number, row in enumerate(bars):
        heights = [row.values.get(name, 0.0) for name in COLUMN_ORDER] + [row.mean or 0.0]
        positions = [index + (number - (len(bars) - 1) / 2) * width for index in range(len(groups))]
        axis.bar(
            positions,
            heights,
            width=width,
            label=f"{row.label} ({row.shot}-shot)",
            hatch="//" if row.source == "paper" else None,
        )
    for row in rows:
        if row.mean_override is not None:
            axis.axhline(row.mean_override, linestyle=":", linewidth=1, color="grey")
            axis.text(
                len(groups) - 0.5,
                row.mean_override,
                f"{row.label} {row.shot}-shot avg",
                fontsize=6,
                ha="right",
                va="bottom",
                color="grey",
            )
    axis.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    axis.set_ylabel("accuracy (both answers right)")
    axis.set_ylim(0, 1)
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_report(
    out_dir: Path, report_dir: Path, title: str, judges: Sequence[str] | None = None, note: str = ""
) -> dict[str, Path]:
    rows = collect_rows(out_dir, judges)
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": report_dir / "cobsat_report.md",
        "csv": report_dir / "cobsat_report.csv",
        "chart": report_dir / "cobsat_report.png",
    }
    write_markdown(paths["markdown"], rows, title, note)
    write_csv(paths["csv"], rows)
    write_chart(paths["chart"], rows, title)
    return paths
