"""Train the ThinkDiff aligner on the paper's proxy task (recipe sections 8 and 9). Only the aligner learns; the
flan-T5 decoder (and, for ThinkDiff-CLIP, the T5 encoder and BLIP-2's vision tower) stay frozen.

ThinkDiff-LVLM: precomputed VLM states E (L generated tokens, see extract_features.py) and their token ids T. Draw s
from 1..min(L-1, 128); the T5 decoder cross-attends to aligner(E[:s]) and must produce T[s:], decoded with the VLM
tokenizer and re-tokenised for T5. The target is the VLM's own continuation, never the dataset caption.
ThinkDiff-CLIP: 65 BLIP-2 image tokens per image, aligned, followed by the T5 encoding of the first part of the
caption (split at a random word); the target is the rest of the caption.

    # tiny CPU run (after `python train/make_tiny_data.py` and `python train/extract_features.py --config train/configs/tiny.yaml`)
    python train/train_aligner.py --config train/configs/tiny.yaml --output-dir runs/tiny
    # one GPU
    accelerate launch --num_processes 1 train/train_aligner.py --config train/configs/lvlm.yaml --output-dir runs/lvlm
    # 4 GPUs, DDP (the paper: 4x A100)
    accelerate launch --multi_gpu --num_processes 4 train/train_aligner.py --config train/configs/lvlm.yaml
    # continue after an interruption, same data order and loss curve
    accelerate launch --multi_gpu --num_processes 4 train/train_aligner.py --config train/configs/lvlm.yaml --resume
    # installed (pip install .): the same as a console script
    thinkdiff-train-aligner --config tiny.yaml          # a shipped config, found by name

This file reads top to bottom: the command line, the model and optimizer, then `train`: set-up, one loop, save. The
parts live beside it: tasks.py (the items and batches), sampler.py (the data order), objective.py (the frozen T5 and
the loss), checkpointing.py (checkpoints, resume, metrics), config.py (every key and its default).

Writes into the output dir: metrics.jsonl (one line per logged step), checkpoints/checkpoint-NNNNNNN/ (complete ones
only, with progress.json), aligner.safetensors (the file the ComfyUI nodes load), loss_curve.png, TensorBoard logs.
Speed (train/README.md, "Speed"): batches grouped by length, the loss on real target tokens only, and, with
`compile: true`, the frozen T5 blocks compiled one by one.
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
import contextlib
import json
import logging
import math
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from thinkdiff_core import AlignerSpec, ThinkDiffAligner, init_norm_from_t5, save_aligner
from thinkdiff_core.dtypes import torch_dtype
from thinkdiff_core.errors import NonFiniteError, report_cli_error
from thinkdiff_core.vision import load_vision_encoder
from thinkdiff_train.checkpointing import (
    RunFolder,
    StepMeter,
    begin_run,
    checkpoint_to_resume,
    list_checkpoints,
    plot_loss_curve,
    run_settings,
    save_checkpoint,
    write_metrics,
)
from thinkdiff_train.config import Config, as_flat_dict, load_config
from thinkdiff_train.objective import FrozenModels, load_frozen_t5, prepare_frozen_models, token_budget, token_losses
from thinkdiff_train.sampler import data_order, training_sampler, validation_batches
from thinkdiff_train.tasks import build_tasks, collate, to_device

logger = logging.getLogger("thinkdiff.train")
LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", required=True, help="YAML config (train/configs/*.yaml); keys are listed in train/config.py"
    )
    parser.add_argument("--output-dir", default=None, help="run folder (overrides output_dir)")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="optimizer steps to train in total (overrides max_steps)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last complete checkpoint in the output dir"
    )
    parser.add_argument(
        "--allow-changed-settings",
        action="store_true",
        help="with --resume: continue although settings that change the result (seed, lr, batch, ...) differ",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set batch_size=8",
    )
    return parser.parse_args(argv)  # values are checked by Config, with the config file's: one message for both


# --- the model and its optimizer, recipe sections 2 and 9 ----------------------------------------------------------


def build_aligner(config: Config, input_dim: int, t5, source_model: str) -> ThinkDiffAligner:
    """The aligner, its norm copied from the T5 encoder's final norm (recipe section 2) unless ablated."""
    torch.manual_seed(config.seed)  # the same initial weights on every process
    spec = AlignerSpec(
        config.variant, input_dim=input_dim, output_dim=t5.config.d_model, source_model=source_model, num_tokens=128
    )
    aligner = ThinkDiffAligner(spec)
    if config.variant == "clip":  # the official CLIP class calls BLIP-2's post_init: normal(0.02) weights, zero biases
        for linear in (aligner.linear_in, aligner.linear_out):
            torch.nn.init.normal_(linear.weight, std=0.02)
            torch.nn.init.zeros_(linear.bias)
    if config.norm_init == "t5":
        init_norm_from_t5(aligner, t5.encoder.final_layer_norm.weight)
    return aligner


def build_optimizer(aligner: torch.nn.Module, config: Config) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only, none on biases and the norm weight (recipe section 9)."""
    decay = [p for p in aligner.parameters() if p.dim() >= 2]
    no_decay = [p for p in aligner.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.warmup_start_learning_rate, betas=(config.beta1, config.beta2))


def get_lr(step: int, config: Config) -> float:
    """Linear warmup from warmup_start_learning_rate to learning_rate, then cosine down to min_learning_rate over
    lr_decay_steps, then flat (recipe section 9: 1e-6 -> 1e-4 in 2000 steps, cosine to 8e-5 over 200k)."""
    if step < config.warmup_steps:
        return (
            config.warmup_start_learning_rate
            + (config.learning_rate - config.warmup_start_learning_rate) * step / config.warmup_steps
        )
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.lr_decay_steps))
    return config.min_learning_rate + 0.5 * (config.learning_rate - config.min_learning_rate) * (
        1 + math.cos(math.pi * progress)
    )


@torch.no_grad()
def estimate_val_loss(
    accelerator: Accelerator, aligner, frozen: FrozenModels, batches: list, val_set, collate_fn
) -> float:
    """Token-weighted mean loss over the fixed held-out batches, summed over processes (independent of their number)."""
    aligner.eval()
    totals = torch.zeros(2, device=accelerator.device)
    for items in batches:
        batch = to_device(collate_fn([val_set[item] for item in items]), accelerator.device)
        with accelerator.autocast():
            loss_sum, count = token_losses(aligner, frozen, batch)
        totals += torch.stack([loss_sum.float(), count.float()])
    totals = accelerator.reduce(totals, "sum")
    aligner.train()
    return (totals[0] / totals[1].clamp(min=1)).item()


def export_aligner(
    accelerator: Accelerator, model, spec: AlignerSpec, config: Config, run: RunFolder
) -> ThinkDiffAligner:
    """The shipped file: this project's safetensors with the spec in its header, as the ComfyUI loader reads it, with
    the ablation choices; then the loss curve. Returns the trained aligner on the CPU, fp32, in eval mode."""
    trained = ThinkDiffAligner(spec)
    trained.load_state_dict(accelerator.get_state_dict(model))
    if accelerator.is_main_process:
        ablations = {"split": config.split, "feature_source": config.feature_source, "norm_init": config.norm_init}
        metadata = {"trained_steps": config.max_steps, "t5_model": Path(config.t5_path).name}
        save_aligner(trained, run.aligner, extra_metadata={**metadata, "training": json.dumps(ablations)})
        plot_loss_curve(run.metrics, run.loss_curve, f"ThinkDiff-{config.variant} aligner")
        logger.info("wrote %s and %s", run.aligner, run.loss_curve)
    return trained.eval()


# --- training -------------------------------------------------------------------------------------------------------


def gradients_are_finite(model: torch.nn.Module) -> torch.Tensor:
    """Whether every gradient of the step is finite, as a device tensor (the aligner has five parameters: cheap)."""
    grads = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
    return torch.stack([torch.isfinite(grad).all() for grad in grads]).all() if grads else torch.tensor(True)


def last_checkpoint_note(run: RunFolder) -> str:
    checkpoints = list_checkpoints(run.checkpoints)
    if not checkpoints:
        return "there is no checkpoint."
    return f"the last checkpoint, {checkpoints[-1][1].name} (step {checkpoints[-1][0]}), is from before it."


def stop_if_not_finite(accelerator: Accelerator, first_bad_step: torch.Tensor, run: RunFolder) -> None:
    """At a logged or saved step (a synchronisation point anyway): raise NonFiniteError if any step since the start
    had a NaN/inf loss or gradient on any process, before its weights can reach a checkpoint or the aligner file."""
    bad = int(accelerator.reduce(first_bad_step.clone(), "max"))
    if bad:
        raise NonFiniteError(
            f"step {bad}: the loss or the gradients became NaN/inf, so training stopped and nothing was exported; "
            f"{last_checkpoint_note(run)} Check the features for NaN (re-extract them), lower learning_rate, or use "
            f"mixed_precision bf16 instead of fp16; then resume (with --allow-changed-settings if you changed keys)."
        )


def training_batches(train_set, config: Config, accelerator: Accelerator, start_step: int, collate_fn) -> Iterator:
    """This process's micro-batches from `start_step` on, in sampler.py's order, collated by the DataLoader's workers
    (pinned on a GPU, so copying them to the device does not wait)."""
    ranks = accelerator.num_processes, accelerator.process_index
    sampler = training_sampler(config, len(train_set), *ranks, start_step, train_set.lengths)
    pin_memory = accelerator.device.type == "cuda"
    return iter(
        DataLoader(
            train_set,
            batch_sampler=sampler,
            collate_fn=collate_fn,
            num_workers=config.num_workers,
            pin_memory=pin_memory,
        )
    )


def train(config: Config, resume: bool = False, allow_changed_settings: bool = False) -> ThinkDiffAligner:
    """Train the aligner `config` describes; return it (CPU, fp32), as also written to OUTPUT_DIR/aligner.safetensors.
    resume: continue from the last complete checkpoint in OUTPUT_DIR, with the same batches and loss curve; other
    settings that change the result are refused unless allow_changed_settings. A NaN/inf loss or gradient stops the
    run with NonFiniteError: no checkpoint after it, no aligner file."""
    run = RunFolder(Path(config.output_dir))
    report_to = None if config.report_to in ("", "none") else config.report_to
    accelerator = Accelerator(mixed_precision=config.mixed_precision, log_with=report_to, project_dir=str(run.root))
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING, format=LOG_FORMAT)
    checkpoint = checkpoint_to_resume(run, resume, accelerator.is_main_process)  # before loading anything

    # Frozen models (recipe section 1): flan-T5 in bf16; BLIP-2's vision tower for the CLIP variant.
    frozen_dtype = torch_dtype(config.frozen_dtype)
    t5, t5_tokenizer = load_frozen_t5(config.t5_path, frozen_dtype)
    clip = config.variant == "clip"
    vision = load_vision_encoder(config.vision_path, frozen_dtype, accelerator.device) if clip else None
    train_set, val_set, input_dim, source_model = build_tasks(config, t5_tokenizer, vision)
    aligner = build_aligner(config, input_dim, t5, source_model)
    frozen = prepare_frozen_models(t5, vision, config, accelerator.device)
    model, optimizer = accelerator.prepare(aligner, build_optimizer(aligner, config))

    # Data: the order depends only on the seed and the step, so resuming needs nothing but the checkpoint's step.
    global_batch = config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    order = data_order(config, global_batch)
    settings = run_settings(config, order)
    start_step, skipped_images = begin_run(
        accelerator, run, checkpoint, len(train_set), settings, allow_changed_settings
    )
    accelerator.init_trackers("thinkdiff", config=as_flat_dict(config))
    collate_fn = partial(collate, pad_id=t5_tokenizer.pad_token_id, pad_to_multiple=config.pad_to_multiple)
    batches = training_batches(train_set, config, accelerator, start_step, collate_fn)
    val_batches = validation_batches(len(val_set), config, accelerator.num_processes, accelerator.process_index)
    sizes = f"{len(train_set)} training / {len(val_set)} held-out samples, aligner {input_dim} -> {t5.config.d_model}"
    logger.info(
        "%s: %s, steps %d..%d, global batch %d", config.variant, sizes, start_step, config.max_steps, global_batch
    )

    meter = StepMeter(accelerator, global_batch, getattr(train_set, "image_tokens", 0), start_step, skipped_images)
    budget, micro_steps = token_budget(config), config.gradient_accumulation_steps
    bar = tqdm(total=config.max_steps, initial=start_step, desc="steps", disable=not accelerator.is_local_main_process)
    first_bad_step = torch.zeros((), dtype=torch.long, device=accelerator.device)  # 0: every step finite so far
    model.train()
    with bar:  # closed on any way out, so that an error message is the last line a failed run prints
        for step in range(start_step + 1, config.max_steps + 1):
            lr = get_lr(step - 1, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logged_loss = torch.zeros(2, device=accelerator.device)  # (numerator, denominator) of the logged loss
            for micro in range(micro_steps):
                batch = to_device(meter.count(next(batches)), accelerator.device)
                synchronise = micro == micro_steps - 1  # all-reduce the gradients once per step
                with contextlib.nullcontext() if synchronise else accelerator.no_sync(model):
                    with accelerator.autocast():
                        loss_sum, count = token_losses(model, frozen, batch)
                        loss = loss_sum / budget if config.length_bucketing else loss_sum / count.clamp(min=1)
                    accelerator.backward(loss / micro_steps)
                # logged: the step's token mean with bucketing; without, the mean of micro-batch means (as T5's loss)
                logged = (loss_sum, count) if config.length_bucketing else (loss, torch.ones_like(count))
                logged_loss += torch.stack(logged).detach().float()
            finite = torch.isfinite(logged_loss).all() & gradients_are_finite(model)  # on the device: no sync
            first_bad_step = torch.where((first_bad_step == 0) & ~finite, step, first_bad_step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)

            log = step % config.log_every == 0 or step in (1, config.max_steps)
            evaluate = config.eval_every and (step % config.eval_every == 0 or step == config.max_steps)
            save = step % config.checkpoint_every == 0 or step == config.max_steps
            if not (log or evaluate or save):
                continue  # no host-device synchronisation between logged steps: the CPU queues the next step
            stop_if_not_finite(accelerator, first_bad_step, run)  # before anything from a NaN step is written
            row = meter.row(step, lr, logged_loss)
            if evaluate:
                row["val_loss"] = estimate_val_loss(accelerator, model, frozen, val_batches, val_set, collate_fn)
                if not math.isfinite(row["val_loss"]):
                    raise NonFiniteError(
                        f"the validation loss at step {step} is {row['val_loss']}: the held-out features hold "
                        f"NaN/inf or the aligner diverged. Nothing was exported; {last_checkpoint_note(run)}"
                    )
            if log or evaluate:
                row.update(skipped_images=meter.skipped_images, elapsed_s=meter.elapsed_s())
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
                write_metrics(accelerator, run, row)
            if save:
                progress = {"step": step, "samples_seen": step * global_batch, "num_train_samples": len(train_set)}
                progress.update(skipped_images=meter.skipped_images, variant=config.variant, data_order=order)
                progress["settings"] = settings
                save_checkpoint(accelerator, run.checkpoints, progress, config.keep_checkpoints)
            meter.restart(step)
    meter.log_summary()

    trained = export_aligner(accelerator, model, aligner.spec, config, run)
    accelerator.end_training()
    return trained


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 once the aligner is written; a ThinkDiffError (a config, data or checkpoint problem the
    user can fix) prints one line saying what to do, and gives 2."""
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides, output_dir=args.output_dir, max_steps=args.max_steps)
        train(config, resume=args.resume, allow_changed_settings=args.allow_changed_settings)
    except Exception as error:  # a ThinkDiffError names its fix; a library's error is translated, no traceback
        return report_cli_error(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
