"""What a training run keeps in its output folder, and how a run picks up from it (train/README.md, "What a run
writes"): checkpoints of the trained weights with the step, the metrics file and the loss curve.

Resuming is loud: --resume with nothing complete to resume from is an error that lists what the folder holds, and so is
a new run in a folder that has checkpoints (it would mix two runs' curves). The step is stored in progress.json, never
read from a folder name; the data position follows from it (sampler.py), so a resumed run sees the same batches.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from thinkdiff_core.errors import ChangedSettingsError, ThinkDiffError, first_line, library_error_message
from thinkdiff_core.files import apply_umask, fsync_path, is_temp_name, write_atomic, write_text_atomic
from thinkdiff_train.tasks import batch_counts

logger = logging.getLogger("thinkdiff.train.checkpointing")


class ResumeError(ThinkDiffError):
    """--resume was asked for but there is nothing complete to resume from, or the data changed."""


class CheckpointSaveError(ThinkDiffError):
    """A checkpoint could not be written; earlier checkpoints are untouched."""


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run's output folder."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def aligner(self) -> Path:
        return self.root / "aligner.safetensors"

    @property
    def loss_curve(self) -> Path:
        return self.root / "loss_curve.png"


# --- checkpoints ---------------------------------------------------------------------------------------------------


def read_progress(folder: Path) -> dict | None:
    """A checkpoint's progress.json, or None when it is missing or unreadable (the folder is then not complete)."""
    try:
        return _progress_or_incomplete(folder)
    except OSError:
        return None


def _progress_or_incomplete(folder: Path) -> dict | None:
    """progress.json as a dict; None when it is absent or not a progress record (a kill mid-write or mid-prune).
    Any other read error (EIO, a stale network mount, no permission) is raised: it says nothing about the folder."""
    try:
        progress = json.loads((folder / "progress.json").read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return progress if isinstance(progress, dict) and isinstance(progress.get("step"), int) else None


def list_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, folder), oldest first; the step is read from progress.json, not the name."""
    found = []
    for folder in sorted(checkpoint_dir.glob("checkpoint-*")) if checkpoint_dir.is_dir() else []:
        progress = read_progress(folder)
        if progress is not None:
            found.append((progress["step"], folder))
    return sorted(found)


def remove_leftovers(run: RunFolder) -> list[str]:
    """What a killed run leaves behind, removed with a message: temp checkpoint folders (.tmp-checkpoint-N, a kill
    while saving), checkpoint folders without progress.json (a kill while an old one was pruned, which deletes
    progress.json first) and write_atomic's temp files. None of them holds anything a resume can use. A temp folder
    that is complete (progress.json is written last) whose checkpoint-N is gone (a kill between the two renames) is
    renamed into place instead. A folder whose progress.json cannot be read for another reason (a disk error, no
    permission) is never removed: that is an error naming it."""
    leftovers = []
    if run.checkpoints.is_dir():
        for temporary in sorted(run.checkpoints.glob(".tmp-checkpoint-*")):
            final = run.checkpoints / temporary.name.removeprefix(".tmp-")
            if not final.exists() and _readable_progress(temporary) is not None:
                os.replace(temporary, final)
                logger.warning("completed the interrupted save of %s (it was whole in %s)", final.name, temporary.name)
            else:
                leftovers.append(temporary)
        leftovers += [folder for folder in run.checkpoints.glob("checkpoint-*") if _readable_progress(folder) is None]
    if run.root.is_dir():
        leftovers += [path for path in run.root.iterdir() if path.is_file() and is_temp_name(path.name)]
    for path in sorted(leftovers):
        logger.warning("removing %s, left incomplete by an interrupted run (nothing in it can be resumed)", path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return [path.name for path in sorted(leftovers)]


def _readable_progress(folder: Path) -> dict | None:
    try:
        return _progress_or_incomplete(folder)
    except OSError as error:
        raise ResumeError(
            f"cannot read {folder / 'progress.json'} ({first_line(error)}); the folder was left as it is. "
            f"Check the disk and the folder's permissions, then rerun."
        ) from error


def set_aside_damaged(checkpoint_dir: Path, resumed_step: int) -> list[str]:
    """Rename the checkpoints newer than the one a resume fell back to (they did not read back) to damaged-checkpoint-N,
    with a message: they stay for inspection, but no longer count as the newest, so pruning cannot keep them in place
    of the good ones."""
    moved = []
    for step, folder in list_checkpoints(checkpoint_dir):
        if step > resumed_step:
            target = folder.with_name(f"damaged-{folder.name}")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(folder, target)
            moved.append(target.name)
            logger.warning(
                "%s did not read back: renamed to %s (training continues from step %d; delete it when you no longer "
                "need it)",
                folder.name,
                target.name,
                resumed_step,
            )
    return moved


def save_checkpoint(accelerator: Accelerator, checkpoint_dir: Path, progress: dict, keep: int) -> None:
    """accelerate's state (weights as safetensors, optimizer, RNG states) into a temp folder, then renamed: a folder
    named checkpoint-N always holds a whole checkpoint. The step and data position go in progress.json.

    A failed write (disk full, no permission) removes the temp folder, leaves every earlier checkpoint as it was and
    raises CheckpointSaveError saying so.
    """
    final = checkpoint_dir / f"checkpoint-{progress['step']:07d}"
    temporary = checkpoint_dir / f".tmp-{final.name}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temporary))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_text_atomic(temporary / "progress.json", json.dumps(progress, indent=1))
            apply_umask(temporary)
            # on the disk before the rename, so a power loss keeps it whole
            for file in [*temporary.rglob("*"), temporary]:
                fsync_path(file)
            shutil.rmtree(final, ignore_errors=True)  # a kill from here to the rename: remove_leftovers completes it
            os.replace(temporary, final)
            fsync_path(checkpoint_dir)
    except (OSError, RuntimeError, SafetensorError) as error:  # torch.save reports a failed write as RuntimeError
        shutil.rmtree(temporary, ignore_errors=True)
        previous = list_checkpoints(checkpoint_dir)
        kept = (
            f"the previous checkpoint {previous[-1][1].name} (step {previous[-1][0]}) is intact"
            if previous
            else "there is no earlier checkpoint"
        )
        raise CheckpointSaveError(
            f"could not write {final.name} in {checkpoint_dir} ({error}); {kept}. Free disk space or fix the "
            f"folder's permissions, then rerun with --resume."
        ) from error
    if accelerator.is_main_process and keep:
        # only older ones: the checkpoint just written is always kept, whatever else the folder holds
        older = [folder for step, folder in list_checkpoints(checkpoint_dir) if step < progress["step"]]
        for old in older[: max(0, len(older) - (keep - 1))]:
            (old / "progress.json").unlink()  # first, so a kill mid-delete never leaves a "complete" half folder
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def describe_folder(folder: Path) -> str:
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return f"{folder} holds {entries}" if entries else f"{folder} does not exist or is empty"


def checkpoint_to_resume(run: RunFolder, resume: bool, is_main_process: bool = True) -> list[tuple[int, Path]] | None:
    """The complete checkpoints, newest first, when resuming (begin_run loads the first that reads back), None for a
    new run. Checked before any model is loaded, so a wrong folder fails in a second, not after minutes of loading.
    Leftovers of a killed run are removed first (remove_leftovers), with a message."""
    removed = remove_leftovers(run) if is_main_process else []
    checkpoints = list_checkpoints(run.checkpoints)
    if resume and not checkpoints:
        raise ResumeError(
            f"--resume: no complete checkpoint (a checkpoint-N folder with progress.json) in {run.checkpoints}; {describe_folder(run.checkpoints)}{f' (removed as incomplete: {removed})' if removed else ''}. Run without --resume to start a new run."
        )
    if checkpoints and not resume:
        raise ResumeError(
            f"{run.root} already has checkpoints up to step {checkpoints[-1][0]}: pass --resume to continue that run, or choose another --output-dir."
        )
    return checkpoints[::-1] if resume else None


def begin_run(
    accelerator: Accelerator,
    run: RunFolder,
    checkpoints: list[tuple[int, Path]] | None,
    num_train_samples: int,
    settings: dict,
    allow_changed_settings: bool = False,
) -> tuple[int, int]:
    """(first step to train, unreadable images skipped so far). A new run starts an empty metrics file; a resumed one
    loads the newest checkpoint that reads back (a damaged one is named and the previous one used), with its
    weights, optimizer and RNG states (accelerate), repairs a torn last metrics line and drops the lines the killed
    run logged after it. Other data is an error; other settings that change the result (`settings`, see
    run_settings) too, unless allow_changed_settings, which only warns."""
    if checkpoints is None:
        if accelerator.is_main_process:
            run.root.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run.metrics, "")
        return 0, 0
    errors = []
    for step, folder in checkpoints:
        progress = read_progress(folder)
        try:
            if progress is None:
                raise ValueError("progress.json is unreadable")
            accelerator.load_state(str(folder))
            break
        except (
            OSError,
            RuntimeError,
            ValueError,
            EOFError,
            KeyError,
            SafetensorError,
            pickle.UnpicklingError,
        ) as error:
            if isinstance(error, torch.OutOfMemoryError):
                raise
            logger.warning(
                "checkpoint %s cannot be read back (%s); trying the previous one", folder.name, first_line(error)
            )
            errors.append(f"{folder.name}: {type(error).__name__}")
    else:
        raise ResumeError(
            f"--resume: none of the checkpoints in {run.checkpoints} reads back ({'; '.join(errors)}). They are "
            f"damaged (a failing disk?): start a new run in another --output-dir."
        )
    if progress["num_train_samples"] != num_train_samples:
        raise ResumeError(
            f"the checkpoint was trained on {progress['num_train_samples']} samples, the data now has {num_train_samples}: resume needs the same data (and features_dir)."
        )
    check_same_settings(progress, settings, step, allow_changed_settings)
    if accelerator.is_main_process:
        if errors:
            set_aside_damaged(run.checkpoints, step)
        keep_metrics_up_to(run.metrics, step)
    logger.info("resumed from %s at step %d", folder, step)
    return step, progress["skipped_images"]


# Config keys whose change alters what a continued run computes (the weights, the batches or the loss); max_steps,
# the paths (folders may move) and the bookkeeping keys may change freely. The batch is compared as the global batch
# (in the data order): how it is split into processes, micro-batches and accumulation does not change the result.
RESULT_KEYS = (
    "variant",
    "seed",
    "frozen_dtype",
    "val_samples",
    "split",
    "feature_source",
    "norm_init",
    "max_prefix_tokens",
    "max_target_tokens",
    "max_input_tokens",
    "caption_max_words",
    "clip_text_tokens",
    "vision_downsample_factor",
    "learning_rate",
    "min_learning_rate",
    "warmup_start_learning_rate",
    "warmup_steps",
    "lr_decay_steps",
    "weight_decay",
    "beta1",
    "beta2",
    "mixed_precision",
)


def run_settings(config, order: dict) -> dict:
    """What progress.json records to check a resume against: the RESULT_KEYS and the data order (sampler.data_order,
    which includes the global batch, so another process count is noticed too)."""
    return {"config": {key: getattr(config, key) for key in RESULT_KEYS}, "data_order": order}


def check_same_settings(progress: dict, settings: dict, step: int, allow: bool) -> None:
    """Refuse a resume whose settings differ from the checkpoint's, naming every differing key (old -> new): the
    curve would silently diverge from the interrupted run's. allow: the user asked for it; warn instead."""
    saved = {**progress.get("settings", {}).get("config", {}), **progress.get("data_order", {})}
    now = {**settings["config"], **settings["data_order"]}
    differing = {key: (saved[key], now[key]) for key in sorted(saved) if key in now and saved[key] != now[key]}
    if not differing:
        return
    listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in differing.items())
    if not allow:
        raise ChangedSettingsError(
            f"--resume: the checkpoint at step {step} was trained with other settings ({listed}); continuing would "
            f"not give the interrupted run's result. Set them back, or pass --allow-changed-settings to continue with "
            f"the new ones on purpose."
        )
    logger.warning(
        "resuming at step %d with changed settings (%s), as --allow-changed-settings asks: the curve from here on "
        "is not the interrupted run's",
        step,
        listed,
    )


# --- metrics --------------------------------------------------------------------------------------------------------


class StepMeter:
    """The numbers of a logged row besides the loss: token counts of the batches (counted on the CPU, so the GPU is
    never waited for), throughput since the last synchronised step, and the run's padding and skipped images."""

    def __init__(
        self, accelerator: Accelerator, global_batch: int, image_tokens: int, start_step: int, skipped_images: int
    ) -> None:
        self.accelerator, self.global_batch, self.image_tokens = accelerator, global_batch, image_tokens
        self.skipped_images, self.started = skipped_images, time.time()
        self.counts = torch.zeros(5, dtype=torch.long)  # batch_counts() since the last synchronised step
        self.run_slots = torch.zeros(4, dtype=torch.float64)  # real and total encoder and target slots of this run
        self.restart(start_step)

    def count(self, cpu_batch: dict) -> dict:
        self.counts += batch_counts(cpu_batch, self.image_tokens)
        return cpu_batch

    def row(self, step: int, lr: float, logged_loss: torch.Tensor) -> dict:
        """The step's metrics, summed over processes: the one host-device synchronisation of a logged step."""
        device = self.accelerator.device
        synced = self.accelerator.reduce(torch.cat([logged_loss, self.counts.to(device, torch.float32)]), "sum")
        numerator, denominator, skipped, *slots = synced.tolist()
        self.skipped_images += int(skipped)
        self.run_slots += torch.tensor(slots)
        first_step, interval_started = self.interval
        return {
            "step": step,
            "loss": numerator / denominator,
            "lr": lr,
            "samples_per_s": round(
                (step - first_step) * self.global_batch / (time.perf_counter() - interval_started), 3
            ),
            "padding_encoder": round(1 - slots[0] / slots[1], 4),  # share of token slots that are padding
            "padding_decoder": round(1 - slots[2] / slots[3], 4),
        }

    def restart(self, step: int) -> None:
        """A new interval from `step`: called after validation and saving, so throughput leaves them out."""
        self.counts.zero_()
        self.interval = (step, time.perf_counter())

    def elapsed_s(self) -> float:
        return round(time.time() - self.started, 3)

    def log_summary(self) -> None:
        """The run's padding share, and a reminder of any unreadable images (each was warned about when met)."""
        slots = self.run_slots
        if slots[1] and slots[3]:
            encoder, target = (100 * (1 - slots[side] / slots[side + 1]) for side in (0, 2))
            logger.info("padding: %.1f%% of the encoder-side and %.1f%% of the target token slots", encoder, target)
        if self.skipped_images and self.accelerator.is_main_process:
            logger.warning("%d unreadable image(s) were skipped (see the warnings above)", self.skipped_images)


def write_metrics(accelerator: Accelerator, run: RunFolder, row: dict) -> None:
    """One logged row to the trackers (TensorBoard) and, from the main process, to metrics.jsonl. A failed append
    (disk full) may leave a torn last line: the error says so, and --resume repairs it (keep_metrics_up_to)."""
    accelerator.log(row, step=row["step"])
    if accelerator.is_main_process:
        try:
            with run.metrics.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        except OSError as error:
            raise CheckpointSaveError(
                f"could not append step {row['step']} to {run.metrics} ({library_error_message(error)}). Earlier "
                f"checkpoints are intact; after fixing it, rerun with --resume (a torn last line is repaired)."
            ) from error


def read_metrics(metrics_path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a line that is not a whole JSON row (torn by a full disk or a kill mid-write) is
    skipped with a warning naming its line number."""
    rows = []
    text = metrics_path.read_text(encoding="utf-8", errors="replace") if metrics_path.is_file() else ""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a metrics row")
        except ValueError:
            logger.warning("%s line %d is not a complete metrics row (a torn write); dropping it", metrics_path, number)
            continue
        rows.append(row)
    return rows


def keep_metrics_up_to(metrics_path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint (a killed run may have logged further: no duplicates) and
    torn lines; the file is replaced atomically, so a kill here loses nothing."""
    if metrics_path.is_file():
        rows = [row for row in read_metrics(metrics_path) if row["step"] <= step]
        write_text_atomic(metrics_path, "".join(json.dumps(row) + "\n" for row in rows))


def plot_loss_curve(metrics_path: Path, image_path: Path, title: str) -> None:
    """Training and validation loss of metrics.jsonl as a PNG: the first thing to look at after a run, no TensorBoard
    needed. matplotlib is imported here: only the main process needs it, once, after the aligner file is written."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    axes.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    val = [r for r in rows if "val_loss" in r]
    if val:
        axes.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    axes.set(xlabel="optimizer step", ylabel="T5 cross-entropy", title=title)
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    write_atomic(image_path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
