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

Writes into the output dir: metrics.jsonl (one line per logged step), checkpoints/checkpoint-NNNNNNN/ (complete ones
only, with progress.json), aligner.safetensors (the file the ComfyUI nodes load), loss_curve.png, TensorBoard logs.
Speed (train/README.md, "Speed"): batches grouped by length, the loss on real target tokens only, and, with
`compile: true`, the frozen T5 blocks compiled one by one.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find thinkdiff_core

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from thinkdiff_core import AlignerSpec, ThinkDiffAligner, init_norm_from_t5, save_aligner  # noqa: E402
from thinkdiff_core.errors import FeatureError, ModelFolderError, ThinkDiffError  # noqa: E402
from thinkdiff_core.vision import encode_images, load_vision_encoder, preprocess_images  # noqa: E402
from thinkdiff_core.vlm import dtype_kwargs  # noqa: E402
from train.config import Config, ConfigError, as_flat_dict, load_config  # noqa: E402
from train.data import FeatureShards, list_samples, read_image_caption  # noqa: E402

logger = logging.getLogger("thinkdiff.train")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CAPTION_PUNCTUATION = '.!"()*#:;~'  # replaced by spaces when cleaning captions (recipe section 8)
IGNORE_INDEX = -100


class ResumeError(ThinkDiffError):
    """--resume was asked for but there is nothing complete to resume from, or the data changed."""


class CheckpointSaveError(ThinkDiffError):
    """A checkpoint could not be written; earlier checkpoints are untouched."""


# --- command line -----------------------------------------------------------------------------------------------


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
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set batch_size=8",
    )
    args = parser.parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        raise SystemExit(f"--max-steps must be at least 1, got {args.max_steps}")
    return args


# --- the proxy task, recipe section 8 ---------------------------------------------------------------------------


def draw_split(length: int, rng: random.Random, max_prefix_tokens: int = 128) -> int:
    """Prefix length s, uniform in 1..min(L-1, max_prefix_tokens): states [0, s) go in, tokens [s, L) are the target.

    L = 1 has no proper split; the official code crashes on it (recipe section 11.6). Here s = 1: the one state goes
    in and the target is empty (only </s>), i.e. "the answer ends here", which is what the VLM did.
    """
    if length < 1:
        raise FeatureError("a sample with no generated tokens cannot be trained on; re-extract its shard.")
    return rng.randint(1, max(1, min(length - 1, max_prefix_tokens)))


def clean_caption(caption: str, max_words: int = 50) -> str:
    """Lower-case, the characters . ! " ( ) * # : ; ~ replaced by spaces, at most max_words words."""
    caption = caption.lower()
    for character in CAPTION_PUNCTUATION:
        caption = caption.replace(character, " ")
    return " ".join(caption.split()[:max_words])


def split_caption(caption: str, rng: random.Random) -> tuple[str, str]:
    """(part 1, part 2) split at a word boundary drawn from 1..n-1; a one-word caption gives an empty part 1."""
    words = caption.split()
    if len(words) < 2:
        return "", caption
    cut = rng.randint(1, len(words) - 1)
    return " ".join(words[:cut]), " ".join(words[cut:])


def t5_token_ids(tokenizer, text: str, max_tokens: int) -> list[int]:
    """T5 ids of `text`, truncated to max_tokens - 1, then </s> (appended by hand, so any tokenizer works)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids[: max_tokens - 1]
    return ids + [tokenizer.eos_token_id]


def t5_target_lengths(tokenizer, texts: list[str], max_tokens: int) -> list[int]:
    """len(t5_token_ids(tokenizer, text, max_tokens)) of each text, tokenised in one batch call."""
    if not texts:
        return []
    return [min(len(ids), max_tokens - 1) + 1 for ids in tokenizer(texts, add_special_tokens=False).input_ids]


def sample_rng(seed: int, epoch: int | str, position: int) -> random.Random:
    """The random draws of one sample depend only on (seed, epoch, position): the same on every process and resume."""
    return random.Random(f"{seed}/{epoch}/{position}")


class LvlmTask(torch.utils.data.Dataset):
    """Training items of ThinkDiff-LVLM from extracted feature shards. An item is (epoch, position)."""

    def __init__(
        self, shards: FeatureShards, positions: list[int], vlm_tokenizer, t5_tokenizer, config: Config
    ) -> None:
        self.shards, self.positions, self.config = shards, positions, config
        self.vlm_tokenizer, self.t5_tokenizer = vlm_tokenizer, t5_tokenizer

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, item: tuple[int | str, int]) -> dict:
        epoch, position = item
        config = self.config
        sample = self.shards[self.positions[position]]
        prefix_tokens, target_ids = self.split(sample["token_ids"], epoch, position)
        if config.features == "input":
            # Ablation (inferred setup): the prompt's own states go in, the whole answer is the target.
            features = sample["prompt_features"][-config.max_input_tokens :]
        else:
            features = sample["features"][:prefix_tokens]
        text = self.vlm_tokenizer.decode(target_ids.tolist(), skip_special_tokens=True)
        return {
            "features": features,
            "target_ids": t5_token_ids(self.t5_tokenizer, text, config.max_target_tokens),
            "skipped": 0,
        }

    def split(self, token_ids: torch.Tensor, epoch: int | str, position: int) -> tuple[int, torch.Tensor]:
        """(how many generated states go in, the token ids to predict) of one item."""
        config = self.config
        if config.features == "input" or not config.split:
            return len(token_ids), token_ids  # ablations: the whole answer is the target
        s = draw_split(len(token_ids), sample_rng(config.seed, epoch, position), config.max_prefix_tokens)
        return s, token_ids[s:]

    def lengths(self, items: list[tuple[int | str, int]]) -> list[tuple[int, int]]:
        """(encoder tokens, target tokens) of each item exactly as __getitem__ makes it, from the token ids and the
        seeded split alone: no feature is read. For length bucketing."""
        config = self.config
        encoder_tokens, target_ids = [], []
        for epoch, position in items:
            index = self.positions[position]
            prefix_tokens, target = self.split(self.shards.token_ids(index), epoch, position)
            if config.features == "input":
                prefix_tokens = min(self.shards.num_prompt_states(index), config.max_input_tokens)
            encoder_tokens.append(prefix_tokens)
            target_ids.append(target.tolist())
        texts = self.vlm_tokenizer.batch_decode(target_ids, skip_special_tokens=True)
        return list(zip(encoder_tokens, t5_target_lengths(self.t5_tokenizer, texts, config.max_target_tokens)))


class ClipTask(torch.utils.data.Dataset):
    """Training items of ThinkDiff-CLIP from image + caption pairs. An item is (epoch, position)."""

    def __init__(self, samples: list, t5_tokenizer, config: Config, image_size: int, image_tokens: int) -> None:
        self.samples, self.t5_tokenizer, self.config, self.image_size = samples, t5_tokenizer, config, image_size
        self.image_tokens = image_tokens  # aligned image tokens per sample (65 for the recipe), never padded

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int | str, int]) -> dict:
        epoch, position = item
        config = self.config
        image, caption, _, skipped = read_image_caption(self.samples, position)  # unreadable: the next one, counted
        part1, part2 = split_caption(
            clean_caption(caption, config.caption_max_words), sample_rng(config.seed, epoch, position)
        )
        return {
            "pixel_values": preprocess_images([image], self.image_size)[0],
            "prompt_ids": t5_token_ids(self.t5_tokenizer, part1, config.clip_text_tokens),
            "target_ids": t5_token_ids(self.t5_tokenizer, part2, config.clip_text_tokens),
            "skipped": skipped,
        }

    def lengths(self, items: list[tuple[int | str, int]]) -> list[tuple[int, int]]:
        """(encoder tokens, target tokens) of each item from its caption alone: no image is read. For an unreadable
        image __getitem__ takes the next sample's caption, so its lengths are off, which only costs a little padding."""
        config = self.config
        parts = [
            split_caption(
                clean_caption(self.samples[position].caption, config.caption_max_words),
                sample_rng(config.seed, epoch, position),
            )
            for epoch, position in items
        ]
        prompt_tokens = t5_target_lengths(self.t5_tokenizer, [first for first, _ in parts], config.clip_text_tokens)
        target_tokens = t5_target_lengths(self.t5_tokenizer, [second for _, second in parts], config.clip_text_tokens)
        return [(self.image_tokens + prompt, target) for prompt, target in zip(prompt_tokens, target_tokens)]


def collate(items: list[dict], pad_id: int, pad_to_multiple: int = 1) -> dict:
    """Right-pad a list of items into a batch, lengths rounded up to a multiple of pad_to_multiple. Masks mark real
    positions, labels use -100 for padding, target_positions are the flat indices of the real target tokens (found
    here on the CPU, so picking them out on the GPU needs no synchronisation)."""
    pad = partial(pad_batch, multiple=pad_to_multiple)
    labels = pad([torch.tensor(i["target_ids"]) for i in items], value=IGNORE_INDEX)
    batch = {
        "labels": labels,
        "target_positions": (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1),
        "skipped": torch.tensor(sum(i["skipped"] for i in items)),
    }
    if "features" in items[0]:
        batch["features"] = pad([i["features"] for i in items])  # zero-padded, (B, S, width)
        batch["feature_mask"] = pad([torch.ones(len(i["features"]), dtype=torch.long) for i in items])
    else:
        batch["pixel_values"] = torch.stack([i["pixel_values"] for i in items])
        batch["prompt_ids"] = pad([torch.tensor(i["prompt_ids"]) for i in items], value=pad_id)
        batch["prompt_mask"] = pad([torch.ones(len(i["prompt_ids"]), dtype=torch.long) for i in items])
    return batch


def pad_batch(sequences: list[torch.Tensor], multiple: int = 1, value: float = 0) -> torch.Tensor:
    """(batch, length, ...) right-padded with `value`; length = the longest sequence rounded up to `multiple`."""
    length = -(-max(len(sequence) for sequence in sequences) // multiple) * multiple
    out = sequences[0].new_full((len(sequences), length, *sequences[0].shape[1:]), value)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = sequence
    return out


def batch_counts(batch: dict, image_tokens: int = 0) -> torch.Tensor:
    """(skipped images, real encoder tokens, encoder token slots, real target tokens, target slots) of a batch still
    on the CPU: counting it never waits for the GPU. CLIP's image tokens (`image_tokens` per sample) are all real."""
    labels = batch["labels"]
    mask = batch["feature_mask"] if "feature_mask" in batch else batch["prompt_mask"]
    images = image_tokens * len(labels)
    counts = [int(batch["skipped"]), int(mask.sum()) + images, mask.numel() + images]
    return torch.tensor([*counts, len(batch["target_positions"]), labels.numel()])


class StepSampler(torch.utils.data.Sampler):
    """This process's micro-batches, step after step from `start_step`, as lists of (epoch, position).

    The global batch of step t is places [t*G, (t+1)*G) of a stream made of one seeded permutation per epoch, with
    G = batch_size * accumulation * processes; micro-batch m of process r is chunk m * processes + r of it. The order
    depends only on the seed and the step, so resuming needs only the step, and one process with accumulation 2
    sees exactly the samples that two processes see.

    Length bucketing (`lengths` given: items -> their (encoder, target) token counts): the steps are taken in windows
    of `bucket_window` (at most one epoch). A window's items, the same as without bucketing, are sorted by
    `bucket_key`, cut into global batches of similar lengths, and these batches are shuffled with a seeded draw. The
    order still depends only on the seed and the step. The lengths of the next window are read one step's share at a
    time while this window is served, so the main process never stops for a whole window's worth.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        accumulation: int,
        num_processes: int,
        process_index: int,
        seed: int,
        start_step: int,
        max_steps: int,
        lengths: Callable[[list[tuple[int, int]]], list[tuple[int, int]]] | None = None,
        bucket_window: int = 256,
        pad_to_multiple: int = 8,
    ) -> None:
        self.num_samples, self.batch_size, self.accumulation = num_samples, batch_size, accumulation
        self.num_processes, self.process_index, self.seed = num_processes, process_index, seed
        self.start_step, self.max_steps = start_step, max_steps
        self.lengths, self.pad_to_multiple = lengths, pad_to_multiple
        self.global_batch_size = batch_size * accumulation * num_processes
        self.window_steps = max(1, min(bucket_window, num_samples // self.global_batch_size))
        self._permutations: dict[int, list[int]] = {}
        self._window: tuple[int, list[list[tuple[int, int]]]] = (-1, [])  # (window, its global batches)
        self._measured: tuple[int, dict[int, list[tuple[int, int]]]] = (-1, {})  # (window, step -> lengths)

    def __len__(self) -> int:
        return (self.max_steps - self.start_step) * self.accumulation

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            items = self.global_batch(step)
            for micro in range(self.accumulation):
                chunk = micro * self.num_processes + self.process_index
                yield items[chunk * self.batch_size : (chunk + 1) * self.batch_size]

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        """The (epoch, position) items of step `step` (0-based), all processes and micro-batches together."""
        if self.lengths is None:
            return self.stream(step * self.global_batch_size, (step + 1) * self.global_batch_size)
        window, offset = divmod(step, self.window_steps)
        if self._window[0] != window:
            self._window = (window, self.bucketed_window(window))
        if (window + 1) * self.window_steps < self.max_steps:
            self.measured_lengths(window + 1, offset)  # the next window's, a step's share at a time
        return self._window[1][offset]

    def bucketed_window(self, window: int) -> list[list[tuple[int, int]]]:
        """The global batches of window `window`, grouped by length and shuffled."""
        size = self.global_batch_size
        start = window * self.window_steps * size
        items = self.stream(start, start + self.window_steps * size)
        lengths = [pair for step in range(self.window_steps) for pair in self.measured_lengths(window, step)]
        keys = [bucket_key(encoder, target, self.pad_to_multiple) for encoder, target in lengths]
        order = sorted(range(len(items)), key=keys.__getitem__)  # stable: ties keep the stream order
        batches = [[items[i] for i in order[first : first + size]] for first in range(0, len(items), size)]
        random.Random(f"{self.seed}/window/{window}").shuffle(batches)
        return batches

    def measured_lengths(self, window: int, step: int) -> list[tuple[int, int]]:
        """The lengths of the items the plain order puts at step `step` of window `window`, read once."""
        if self._measured[0] != window:
            self._measured = (window, {})
        if step not in self._measured[1]:
            start = (window * self.window_steps + step) * self.global_batch_size
            self._measured[1][step] = self.lengths(self.stream(start, start + self.global_batch_size))
        return self._measured[1][step]

    def stream(self, start: int, end: int) -> list[tuple[int, int]]:
        """Places [start, end) of the stream of seeded per-epoch permutations, as (epoch, position)."""
        return [
            (place // self.num_samples, self.permutation(place // self.num_samples)[place % self.num_samples])
            for place in range(start, end)
        ]

    def permutation(self, epoch: int) -> list[int]:
        if epoch not in self._permutations:
            self._permutations = {
                epoch: torch.randperm(
                    self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch)
                ).tolist()
            }
        return self._permutations[epoch]


def bucket_key(encoder_tokens: int, target_tokens: int, multiple: int) -> tuple[int, int]:
    """Sort key of length bucketing: the padded target length first (the decoder side does most of the work), then
    the prefix length, ascending in even rows and descending in odd ones, so that consecutive rows meet at similar
    prefix lengths where a global batch straddles them."""
    row = -(-target_tokens // multiple)
    return row, encoder_tokens if row % 2 == 0 else -encoder_tokens


def validation_batches(
    num_samples: int, config: Config, num_processes: int, process_index: int
) -> list[list[tuple[str, int]]]:
    """Fixed held-out batches: val_batches global batches (cycling over the held-out set), dealt out like training."""
    total = config.val_batches * config.batch_size * config.gradient_accumulation_steps * num_processes
    places = [("val", place % num_samples) for place in range(total)]
    chunks = [places[start : start + config.batch_size] for start in range(0, total, config.batch_size)]
    return chunks[process_index::num_processes]


# --- models ------------------------------------------------------------------------------------------------------


def load_frozen_t5(path: str, dtype: torch.dtype):
    """flan-T5 from a local folder (never downloaded), frozen, in eval mode; and its tokenizer."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    if not path or not (Path(path) / "config.json").is_file():
        raise ModelFolderError(
            f"t5_path '{path}' is not a model folder with config.json. Set it to a local copy of google/flan-t5-xxl."
        )
    t5 = T5ForConditionalGeneration.from_pretrained(path, local_files_only=True, **dtype_kwargs(dtype))
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return t5.eval().requires_grad_(False), tokenizer


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


class TargetCrossEntropy(torch.nn.Module):
    """T5's output layer and cross-entropy for the real target tokens only: (tokens, d_model) decoder states and
    (tokens,) ids -> summed loss (fp32). Padding never reaches the 32128-wide output layer."""

    def __init__(self, t5) -> None:
        super().__init__()
        self.lm_head = t5.lm_head
        # Original T5 scales the decoder output before its tied output layer, flan-T5 (T5 v1.1) does not; transformers
        # 5 calls the switch scale_decoder_outputs, earlier versions read it from tie_word_embeddings.
        config = t5.config
        self.scale = (
            config.d_model**-0.5 if getattr(config, "scale_decoder_outputs", config.tie_word_embeddings) else 1.0
        )

    def forward(self, states: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(states * self.scale if self.scale != 1.0 else states)
        return F.cross_entropy(logits.float(), target_ids, reduction="sum")


@dataclass
class FrozenModels:
    """The frozen side of the proxy task: flan-T5 (its decoder; for CLIP also its encoder), the output-layer loss and,
    for CLIP, BLIP-2's vision tower with its token downsampling."""

    t5: torch.nn.Module
    target_loss: TargetCrossEntropy
    vision: torch.nn.Module | None = None
    downsample_factor: int = 2


def compile_frozen_models(frozen: FrozenModels, backend: str = "inductor") -> None:
    """torch.compile each T5 block and the output-layer loss, with dynamic shapes (regional compilation).

    One graph serves every block after the first, so the first step compiles two blocks, not the model; dynamic
    shapes let every bucket length (a multiple of pad_to_multiple) reuse the same graphs instead of compiling one per
    shape. Weights stay as loaded: bf16 on the GPU, never cast per step.
    """
    # All compiled modules share nn.Module's call, hence one graph cache: block 0 (it computes the position bias) and
    # the other blocks, the loss, each with and without grad (validation), the encoder's for CLIP. That is more than
    # torch's default limit of 8, past which it would silently run eager.
    dynamo_config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 64))
    # "Duck sizing" gives dims of equal size one symbol: a first batch with as many prefix as target tokens would tie
    # the two, and the next batch would compile every block again.
    shape_config = importlib.import_module("torch.fx.experimental._config")
    if hasattr(shape_config, "use_duck_shape"):
        shape_config.use_duck_shape = False
    for stack in (frozen.t5.encoder, frozen.t5.decoder):
        for block in stack.block if stack is not None else []:
            block.compile(backend=backend, dynamic=True)
    frozen.target_loss.compile(backend=backend, dynamic=True)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (B, S) padding mask as the (B, 1, 1, S) additive mask transformers uses as given. From a 2D mask it would
    first ask the GPU whether there is any padding at all (`mask.all()` in Python), a host synchronisation on every
    step that leaves the GPU idle while the CPU queues the next one."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def token_losses(aligner, frozen: FrozenModels, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of target-token cross-entropies, number of target tokens) of the frozen T5 decoder for one batch.

    The decoder cross-attends to the aligned tokens as its encoder output (no T5 text encoder for the LVLM variant;
    for CLIP the T5-encoded caption part 1 follows the aligned image tokens). Its states at the real target positions
    only go through the output layer: the same loss as T5's own over the padded batch, without the padding's work.
    """
    t5 = frozen.t5
    if "features" in batch:
        aligned, mask = aligner(batch["features"]), batch["feature_mask"]  # (B, s, d_model)
    else:
        with torch.no_grad():
            # (B, 65, width)
            image_tokens = encode_images(frozen.vision, batch["pixel_values"], frozen.downsample_factor)
            text_states = t5.encoder(
                input_ids=batch["prompt_ids"], attention_mask=additive_mask(batch["prompt_mask"], t5.dtype)
            ).last_hidden_state
        aligned_images = aligner(image_tokens.float())
        aligned = torch.cat(
            [aligned_images, text_states.to(aligned_images.dtype)], dim=1
        )  # images first (recipe section 7)
        image_mask = torch.ones(aligned_images.shape[:2], dtype=torch.long, device=aligned_images.device)
        mask = torch.cat([image_mask, batch["prompt_mask"]], dim=1)
    labels, positions = batch["labels"], batch["target_positions"]
    states = t5.decoder(
        input_ids=t5.prepare_decoder_input_ids_from_labels(labels=labels),
        encoder_hidden_states=aligned.to(t5.dtype),
        encoder_attention_mask=additive_mask(mask, t5.dtype),
        use_cache=False,
    ).last_hidden_state  # (B, T, d_model)
    loss_sum = frozen.target_loss(
        states.flatten(0, 1).index_select(0, positions), labels.flatten().index_select(0, positions)
    )
    return loss_sum, (labels != IGNORE_INDEX).sum()


# --- data and models for a config ---------------------------------------------------------------------------------


def build_tasks(
    config: Config, t5_tokenizer, vision
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, int, str]:
    """(training set, held-out set, aligner input width, source model name) for the config's variant."""
    if config.variant == "lvlm":
        from transformers import AutoTokenizer

        shards = FeatureShards(config.features_dir)
        if config.features == "input" and not shards.has_prompt_states:
            raise ConfigError(
                "features='input' needs prompt-token states: re-run extract_features.py with --set keep_prompt_states=true."
            )
        vlm_tokenizer = AutoTokenizer.from_pretrained(
            config.vlm_path, local_files_only=True
        )  # decodes the VLM's token ids
        train_positions, val_positions = hold_out(list(range(len(shards))), config.val_samples)
        make = partial(LvlmTask, shards, vlm_tokenizer=vlm_tokenizer, t5_tokenizer=t5_tokenizer, config=config)
        source_model = shards.shards[0][1].get("vlm") or Path(config.vlm_path).name
        return make(train_positions), make(val_positions), shards.width, source_model
    samples = list_samples(config.train_data)
    if config.val_data:
        train_samples, val_samples = samples, list_samples(config.val_data)
    else:
        train_samples, val_samples = hold_out(samples, config.val_samples)
    image_size = vision.config.image_size
    grid = image_size // vision.config.patch_size // config.vision_downsample_factor
    make = partial(ClipTask, t5_tokenizer=t5_tokenizer, config=config, image_size=image_size, image_tokens=1 + grid**2)
    return make(train_samples), make(val_samples), vision.config.hidden_size, Path(config.vision_path).name


def hold_out(items: list, count: int) -> tuple[list, list]:
    """The last `count` items (at most half) are held out for validation; the rest train."""
    count = min(count, len(items) // 2)
    if count == 0:
        raise ConfigError(
            f"only {len(items)} sample(s): too few to hold any out for validation. Add data or set val_data."
        )
    return items[:-count], items[-count:]


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


def data_order(config: Config, global_batch: int) -> dict:
    """The settings that, with the seed, fix which samples each step sees; stored in progress.json."""
    keys = ("length_bucketing", "bucket_window", "pad_to_multiple")
    return {**{key: getattr(config, key) for key in keys}, "global_batch": global_batch}


def describe_folder(folder: Path) -> str:
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return f"{folder} holds {entries}" if entries else f"{folder} does not exist or is empty"


# --- metrics --------------------------------------------------------------------------------------------------------


def keep_metrics_up_to(metrics_path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint (a killed run may have logged further): no duplicates."""
    if metrics_path.is_file():
        lines = [
            line for line in metrics_path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
        ]
        metrics_path.write_text("".join(line + "\n" for line in lines))


def plot_loss_curve(metrics_path: Path, image_path: Path, title: str) -> None:
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


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}  # pinned: asynchronous


# --- training -------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> ThinkDiffAligner:
    """Train; return the trained aligner (on the CPU, fp32), which is also written to OUTPUT_DIR/aligner.safetensors."""
    args = parse_args(argv)
    config = load_config(args.config, args.overrides, output_dir=args.output_dir, max_steps=args.max_steps)
    output_dir, checkpoint_dir = Path(config.output_dir), Path(config.output_dir) / "checkpoints"
    metrics_path = output_dir / "metrics.jsonl"
    report_to = None if config.report_to in ("", "none") else config.report_to
    accelerator = Accelerator(mixed_precision=config.mixed_precision, log_with=report_to, project_dir=str(output_dir))
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    checkpoints = list_checkpoints(checkpoint_dir)
    if args.resume and not checkpoints:
        raise ResumeError(
            f"--resume: no complete checkpoint (a checkpoint-N folder with progress.json) in {checkpoint_dir}; {describe_folder(checkpoint_dir)}. Run without --resume to start a new run."
        )
    if checkpoints and not args.resume:
        raise ResumeError(
            f"{output_dir} already has checkpoints up to step {checkpoints[-1][0]}: pass --resume to continue that run, or choose another --output-dir."
        )

    # Frozen models (recipe section 1): flan-T5 in bf16; BLIP-2's vision tower for the CLIP variant.
    frozen_dtype = DTYPES[config.frozen_dtype]
    t5, t5_tokenizer = load_frozen_t5(config.t5_path, frozen_dtype)
    vision = (
        load_vision_encoder(config.vision_path, frozen_dtype, accelerator.device) if config.variant == "clip" else None
    )
    train_set, val_set, input_dim, source_model = build_tasks(config, t5_tokenizer, vision)
    aligner = build_aligner(config, input_dim, t5, source_model)
    if config.variant == "lvlm":
        t5.encoder = None  # only the decoder is needed once the norm is copied (the official code deletes it too)
    t5.to(accelerator.device)
    frozen = FrozenModels(t5, TargetCrossEntropy(t5), vision, config.vision_downsample_factor)
    if config.compile:
        compile_frozen_models(frozen, config.compile_backend)
    optimizer = build_optimizer(aligner, config)
    model, optimizer = accelerator.prepare(aligner, optimizer)
    collate_fn = partial(collate, pad_id=t5_tokenizer.pad_token_id, pad_to_multiple=config.pad_to_multiple)
    global_batch = config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    order = data_order(config, global_batch)

    # Resume: weights, optimizer and RNG states from accelerate; the data position is the step itself.
    start_step, skipped_images = 0, 0
    if args.resume:
        start_step, folder = checkpoints[-1]
        accelerator.load_state(str(folder))
        progress = json.loads((folder / "progress.json").read_text())
        if progress["num_train_samples"] != len(train_set):
            raise ResumeError(
                f"the checkpoint was trained on {progress['num_train_samples']} samples, the data now has {len(train_set)}: resume needs the same data (and features_dir)."
            )
        if progress.get("data_order", order) != order:
            logger.warning(
                "the checkpoint's data order %s differs from this run's %s: the batches from step %d on are not those "
                "the interrupted run would have seen. Set the keys back to resume the same curve.",
                progress["data_order"],
                order,
                start_step,
            )
        skipped_images = progress["skipped_images"]
        if accelerator.is_main_process:
            keep_metrics_up_to(metrics_path, start_step)
        logger.info("resumed from %s at step %d", folder, start_step)
    elif accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")
    accelerator.init_trackers("thinkdiff", config=as_flat_dict(config))

    sampler = StepSampler(
        len(train_set),
        config.batch_size,
        config.gradient_accumulation_steps,
        accelerator.num_processes,
        accelerator.process_index,
        config.seed,
        start_step,
        config.max_steps,
        lengths=train_set.lengths if config.length_bucketing else None,
        bucket_window=config.bucket_window,
        pad_to_multiple=config.pad_to_multiple,
    )
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=config.num_workers,
        persistent_workers=False,
        pin_memory=accelerator.device.type == "cuda",
    )
    val_batches = validation_batches(len(val_set), config, accelerator.num_processes, accelerator.process_index)
    logger.info(
        "%s: %d training / %d held-out samples, aligner %d -> %d, steps %d..%d, global batch %d",
        config.variant,
        len(train_set),
        len(val_set),
        input_dim,
        t5.config.d_model,
        start_step,
        config.max_steps,
        global_batch,
    )

    progress_bar = tqdm(
        total=config.max_steps, initial=start_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    batches = iter(loader)
    # With bucketing, a micro-batch's summed loss is divided by a fixed token budget, not by its own token count, so
    # that every target token weighs the same whatever the batch holds (see config.py, length_bucketing).
    token_budget = config.batch_size * (
        config.clip_text_tokens if config.variant == "clip" else config.max_target_tokens
    )
    image_tokens = getattr(train_set, "image_tokens", 0)
    counts = torch.zeros(5, dtype=torch.long)  # batch_counts() since the last synchronised step, on the CPU
    run_slots = torch.zeros(4, dtype=torch.float64)  # real and total encoder and target token slots of this run, for the closing note
    started, interval_started, interval_steps = time.time(), time.perf_counter(), 0
    model.train()
    for step in range(start_step + 1, config.max_steps + 1):
        lr = get_lr(step - 1, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logged_loss = torch.zeros(2, device=accelerator.device)  # (numerator, denominator) of this step's logged loss
        for micro in range(config.gradient_accumulation_steps):
            cpu_batch = next(batches)
            counts += batch_counts(cpu_batch, image_tokens)
            batch = to_device(cpu_batch, accelerator.device)
            last = micro == config.gradient_accumulation_steps - 1
            with accelerator.no_sync(model) if not last else contextlib.nullcontext():  # all-reduce once per step
                with accelerator.autocast():
                    loss_sum, count = token_losses(model, frozen, batch)
                    loss = loss_sum / token_budget if config.length_bucketing else loss_sum / count.clamp(min=1)
                accelerator.backward(loss / config.gradient_accumulation_steps)
            # logged: the step's token mean with bucketing; without, the mean of micro-batch token means (as T5's loss)
            logged = (loss_sum, count) if config.length_bucketing else (loss, torch.ones_like(count))
            logged_loss += torch.stack(logged).detach().float()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress_bar.update(1)
        interval_steps += 1

        log = step % config.log_every == 0 or step == config.max_steps or step == 1
        evaluate = config.eval_every and (step % config.eval_every == 0 or step == config.max_steps)
        save = step % config.checkpoint_every == 0 or step == config.max_steps
        if not (log or evaluate or save):
            continue  # no host-device synchronisation between logged steps: the CPU queues the next step meanwhile
        synced = accelerator.reduce(torch.cat([logged_loss, counts.to(accelerator.device, torch.float32)]), "sum")
        numerator, denominator, skipped, *slots = synced.tolist()
        skipped_images += int(skipped)
        run_slots += torch.tensor(slots)
        row = {
            "step": step,
            "loss": numerator / denominator,
            "lr": lr,
            "samples_per_s": round(interval_steps * global_batch / (time.perf_counter() - interval_started), 3),
            "padding_encoder": round(1 - slots[0] / slots[1], 4),  # share of token slots that are padding
            "padding_decoder": round(1 - slots[2] / slots[3], 4),
        }
        if evaluate:
            row["val_loss"] = estimate_val_loss(accelerator, model, frozen, val_batches, val_set, collate_fn)
        if log or evaluate:
            row.update(skipped_images=skipped_images, elapsed_s=round(time.time() - started, 3))
            progress_bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
            accelerator.log(row, step=step)
            if accelerator.is_main_process:
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
        if save:
            progress = {
                "step": step,
                "samples_seen": step * global_batch,
                "num_train_samples": len(train_set),
                "skipped_images": skipped_images,
                "variant": config.variant,
                "data_order": order,
            }
            save_checkpoint(accelerator, checkpoint_dir, progress, config.keep_checkpoints)
        counts.zero_()
        interval_started, interval_steps = time.perf_counter(), 0  # throughput leaves out validation and saving
    progress_bar.close()
    if run_slots[1] and run_slots[3]:
        encoder, target = (100 * (1 - run_slots[side] / run_slots[side + 1]) for side in (0, 2))
        logger.info("padding: %.1f%% of the encoder-side and %.1f%% of the target token slots", encoder, target)

    # The shipped file: this project's safetensors with the spec in its header, as the ComfyUI loader reads it.
    trained = ThinkDiffAligner(aligner.spec)
    trained.load_state_dict(accelerator.get_state_dict(model))
    if accelerator.is_main_process:
        ablations = {"split": config.split, "features": config.features, "norm_init": config.norm_init}
        save_aligner(
            trained,
            output_dir / "aligner.safetensors",
            extra_metadata={
                "trained_steps": config.max_steps,
                "t5_model": Path(config.t5_path).name,
                "training": json.dumps(ablations),
            },
        )
        plot_loss_curve(metrics_path, output_dir / "loss_curve.png", f"ThinkDiff-{config.variant} aligner")
        if skipped_images:
            logger.warning("%d unreadable image(s) were skipped (see the warnings above)", skipped_images)
        logger.info("wrote %s and %s", output_dir / "aligner.safetensors", output_dir / "loss_curve.png")
    accelerator.end_training()
    return trained.eval()


if __name__ == "__main__":
    try:
        main()
    except ThinkDiffError as error:
        sys.exit(f"error: {error}")
