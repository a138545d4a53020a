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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from thinkdiff_core.errors import ThinkDiffError
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


def list_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, folder), oldest first; the step is read from progress.json, not the name."""
    found = []
    for folder in sorted(checkpoint_dir.glob("checkpoint-*")) if checkpoint_dir.is_dir() else []:
        progress = folder / "progress.json"
        if progress.is_file():
            found.append((json.loads(progress.read_text())["step"], folder))
    return sorted(found)


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
            (temporary / "progress.json").write_text(json.dumps(progress, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(temporary, final)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as RuntimeError
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
    if accelerator.is_main_process:
        for _, old in list_checkpoints(checkpoint_dir)[:-keep] if keep else []:
            (old / "progress.json").unlink()  # first, so a kill mid-delete never leaves a "complete" half folder
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def describe_folder(folder: Path) -> str:
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return f"{folder} holds {entries}" if entries else f"{folder} does not exist or is empty"


def checkpoint_to_resume(run: RunFolder, resume: bool) -> tuple[int, Path] | None:
    """(step, folder) of the last complete checkpoint when resuming, None for a new run. Checked before any model is
    loaded, so a wrong folder fails in a second, not after minutes of loading."""
    checkpoints = list_checkpoints(run.checkpoints)
    if resume and not checkpoints:
        raise ResumeError(
            f"--resume: no complete checkpoint (a checkpoint-N folder with progress.json) in {run.checkpoints}; {describe_folder(run.checkpoints)}. Run without --resume to start a new run."
        )
    if checkpoints and not resume:
        raise ResumeError(
            f"{run.root} already has checkpoints up to step {checkpoints[-1][0]}: pass --resume to continue that run, or choose another --output-dir."
        )
    return checkpoints[-1] if resume else None


def begin_run(
    accelerator: Accelerator, run: RunFolder, checkpoint: tuple[int, Path] | None, num_train_samples: int, order: dict
) -> tuple[int, int]:
    """(first step to train, unreadable images skipped so far). A new run starts an empty metrics file; a resumed one
    loads the checkpoint's weights, optimizer and RNG states (accelerate) and drops the metrics lines the killed run
    logged after it. Other data is an error; another data order (`order`, sampler.data_order) only a warning, since
    it changes the batches from here on but not what was learned."""
    if checkpoint is None:
        if accelerator.is_main_process:
            run.root.mkdir(parents=True, exist_ok=True)
            run.metrics.write_text("")
        return 0, 0
    step, folder = checkpoint
    accelerator.load_state(str(folder))
    progress = json.loads((folder / "progress.json").read_text())
    if progress["num_train_samples"] != num_train_samples:
        raise ResumeError(
            f"the checkpoint was trained on {progress['num_train_samples']} samples, the data now has {num_train_samples}: resume needs the same data (and features_dir)."
        )
    if progress.get("data_order", order) != order:
        logger.warning(
            "the checkpoint's data order %s differs from this run's %s: the batches from step %d on are not those "
            "the interrupted run would have seen. Set the keys back to resume the same curve.",
            progress["data_order"],
            order,
            step,
        )
    if accelerator.is_main_process:
        keep_metrics_up_to(run.metrics, step)
    logger.info("resumed from %s at step %d", folder, step)
    return step, progress["skipped_images"]


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
    """One logged row to the trackers (TensorBoard) and, from the main process, to metrics.jsonl."""
    accelerator.log(row, step=row["step"])
    if accelerator.is_main_process:
        with run.metrics.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


def keep_metrics_up_to(metrics_path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint (a killed run may have logged further): no duplicates."""
    if metrics_path.is_file():
        lines = [
            line for line in metrics_path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
        ]
        metrics_path.write_text("".join(line + "\n" for line in lines))


def plot_loss_curve(metrics_path: Path, image_path: Path, title: str) -> None:
    """Training and validation loss of metrics.jsonl as a PNG: the first thing to look at after a run, no TensorBoard
    needed. matplotlib is imported here: only the main process needs it, once, after the aligner file is written."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    axes.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    val = [r for r in rows if "val_loss" in r]
    if val:
        axes.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    axes.set(xlabel="optimizer step", ylabel="T5 cross-entropy", title=title)
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(image_path)
    plt.close(figure)
