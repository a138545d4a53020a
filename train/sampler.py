"""The order in which training sees its samples: which (epoch, position) items make up each step's global batch, and
which of them each process and micro-batch takes.

The order depends only on the seed and the step, never on the process count or on earlier runs, so that a resumed run
(needing only the step from progress.json) sees exactly the batches the interrupted one would have seen, and one
process with gradient accumulation 2 sees what two processes see. Length bucketing regroups the samples of a window of
steps by length (less padding) and keeps that property.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from thinkdiff_train.config import Config


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


def training_sampler(
    config: Config, num_samples: int, num_processes: int, process_index: int, start_step: int, lengths: Callable
) -> StepSampler:
    """This process's order from `start_step` on, as the config sets it; `lengths` (the task's) only with bucketing."""
    return StepSampler(
        num_samples,
        config.batch_size,
        config.gradient_accumulation_steps,
        num_processes,
        process_index,
        config.seed,
        start_step,
        config.max_steps,
        lengths=lengths if config.length_bucketing else None,
        bucket_window=config.bucket_window,
        pad_to_multiple=config.pad_to_multiple,
    )


def data_order(config: Config, global_batch: int) -> dict:
    """The settings that, with the seed, fix which samples each step sees; stored in progress.json, so that a resume
    with other settings (which would see other batches) is noticed."""
    keys = ("length_bucketing", "bucket_window", "pad_to_multiple")
    return {**{key: getattr(config, key) for key in keys}, "global_batch": global_batch}
