"""Benchmark: one aligner training step through the frozen flan-T5-XXL decoder, ours against the reference step (the
plain one train_aligner.py took before), same process and inputs.

    python bench/bench_train_step.py --tiny                  # tiny T5 on CPU in seconds (CI runs this)
    python bench/bench_train_step.py --device cuda           # GPU: flan-T5-XXL decoder shapes, random bf16 weights
    python bench/bench_train_step.py --layers 2              # a quick check of the real-shape path, not a timing

Prints one JSON object:
  - the device's measured matrix peak: a bf16 8192^3 matmul timed with CUDA events (fp32 512^3 on a CPU);
  - on the reference shapes (batch 32, 64 prefix states of width 3584, 64 target tokens; aligner fp32 under bf16
    autocast, T5 in bf16) the reference step, T5's forward with logits at every position as train_aligner.py computed
    it before, and ours, the decoder states gathered at the real target tokens before the output layer, its T5 blocks
    and loss compiled (--compile auto: on a GPU): step time, samples/s, TFLOP/s and fraction of the peak, peak memory,
    and the loss and gradient differences between the two;
  - the recipe's length mix (L generated tokens uniform in 128..256, or --generated MIN MAX; prefix s drawn as in
    training; targets the other L - s tokens, capped at 128 with </s>): padding without bucketing (random batches
    padded to their longest, as before) and with it (train_aligner.py's sampler, lengths padded to multiples of 8),
    each path timed on a few of its batches, and the hours the recipe's 3.2 M samples take on one such card at our
    measured rate (and, for scale, at 75% of the measured peak).
A step is forward, backward and the AdamW update of the aligner. Random weights of the real shapes are enough to time:
nothing is downloaded, and only the decoder is built (the LVLM variant never runs the T5 encoder).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from bench_common import environment  # found beside this script, or through pytest's pythonpath
from thinkdiff_core import AlignerSpec, ThinkDiffAligner
from thinkdiff_core.hf_compat import t5_attn_implementation, t5_empty_encoder_layers
from thinkdiff_train.config import Config
from thinkdiff_train.objective import FrozenModels, TargetCrossEntropy, compile_frozen_models, token_losses
from thinkdiff_train.sampler import StepSampler
from thinkdiff_train.tasks import IGNORE_INDEX, collate, draw_split, sample_rng, to_device
from thinkdiff_train.train_aligner import build_optimizer

# google/flan-t5-xxl's config.json, the dims that set the cost; the aligner reads Qwen2-VL-7B's 3584-wide states.
FLAN_T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_decoder_layers=24)
TINY_T5 = dict(vocab_size=320, d_model=32, d_ff=37, d_kv=8, num_heads=2, num_decoder_layers=2)
VLM_WIDTH, TINY_VLM_WIDTH = 3584, 64
RECIPE_SAMPLES = 3_200_000  # the paper's LVLM run: 25k steps of 128
FLOPS_FORMULA = (
    "per sample, s prefix states, t target tokens, L layers, d = d_model, i = heads * d_kv, f = d_ff, V = vocab, "
    "w = aligner input width. Forward: L * (2t*d*(6i + 3f) + 2s*d*2i + 4t*(t + s)*i) + 2t*d*V + 2s*(w*d + d*d). "
    "Backward: input gradients only through the frozen decoder (no weight gradients), so its linear layers and the "
    "output layer once more and the attention products twice, minus layer 0's self-attention (no gradient reaches "
    "it): L * (2t*d*(6i + 3f) + 2s*d*2i + 8t*(t + s)*i) - (8t*d*i + 8t*t*i) + 2t*d*V; the aligner's weight "
    "gradients 2s*w*d + 4s*d*d. Matrix products only; the full t*t attention square is counted, as the kernels run it."
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny T5 (CPU-friendly); the length mix keeps its lengths")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prefix-tokens", type=int, default=64, help="reference shape: aligned prefix states")
    parser.add_argument("--target-tokens", type=int, default=64, help="reference shape: target tokens")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps on the reference shapes (10; 3 tiny)")
    parser.add_argument("--mix-batches", type=int, default=None, help="timed batches of the length mix (12; 3 tiny)")
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="compile our T5 blocks and loss (auto: on CUDA)",
    )
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager on a CPU)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (24; 2 tiny)")
    parser.add_argument("--bucket-window", type=int, default=256, help="steps grouped by length (train: bucket_window)")
    parser.add_argument("--pad-to-multiple", type=int, default=8)
    parser.add_argument(
        "--generated", type=int, nargs=2, default=[128, 256], metavar=("MIN", "MAX"), help="length mix: L's range"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# --- models and inputs ------------------------------------------------------------------------------------------------


def build_t5(shape: dict, device: torch.device, dtype: torch.dtype):
    """A random-weight flan-T5 of `shape`, decoder only (no encoder layers), frozen, as training holds it."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        **shape,
        num_layers=t5_empty_encoder_layers(),
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,  # flan-T5: no output scaling
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        t5 = T5ForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=t5_attn_implementation())
    t5.encoder = None
    with torch.no_grad():  # logits scaled like a trained model's, so that the loss is a sensible number
        t5.lm_head.weight.normal_(0.0, config.d_model**-0.5)
    return t5.eval().requires_grad_(False)


def build_aligner(input_dim: int, output_dim: int, device: torch.device) -> ThinkDiffAligner:
    torch.manual_seed(1)
    return ThinkDiffAligner(AlignerSpec("lvlm", input_dim=input_dim, output_dim=output_dim)).to(device)


def make_batch(lengths: list[tuple[int, int]], width: int, vocab: int, multiple: int, seed: int) -> dict:
    """A CPU batch as training's collate (train/tasks.py) makes it: random features and target ids of the given
    lengths."""
    generator = torch.Generator().manual_seed(seed)
    items = [
        {
            "features": torch.randn(prefix, width, generator=generator),
            "target_ids": [*torch.randint(2, vocab, (target - 1,), generator=generator).tolist(), 1],  # ... </s>
            "skipped": 0,
        }
        for prefix, target in lengths
    ]
    return collate(items, pad_id=0, pad_to_multiple=multiple)


def recipe_length_mix(count: int, seed: int, generated=(128, 256), max_prefix=128, max_target=128) -> list:
    """(prefix states, target tokens) of `count` samples of the recipe's mix: L generated tokens uniform in
    `generated`, s drawn as training draws it, the other L - s tokens the target (one T5 token per VLM token
    assumed), capped at max_target - 1 plus </s>."""
    rng = random.Random(seed)
    mix = []
    for position in range(count):
        length = rng.randint(*generated)
        prefix = draw_split(length, sample_rng(seed, 0, position), max_prefix)
        mix.append((prefix, min(length - prefix, max_target - 1) + 1))
    return mix


# --- the two steps ----------------------------------------------------------------------------------------------------


def reference_token_losses(aligner, t5, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss as train_aligner.py computed it before: T5's own forward, logits at every position (padding too)."""
    from transformers.modeling_outputs import BaseModelOutput

    labels = batch["labels"]
    outputs = t5(
        encoder_outputs=BaseModelOutput(last_hidden_state=aligner(batch["features"]).to(t5.dtype)),
        attention_mask=batch["feature_mask"],
        decoder_input_ids=t5.prepare_decoder_input_ids_from_labels(labels=labels),
    )
    loss_sum = F.cross_entropy(
        outputs.logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (labels != IGNORE_INDEX).sum()


@dataclass
class StepPath:
    """One way of computing the step: its loss function (aligner, batch) -> (loss sum, tokens), its own aligner copy
    and optimizer (both paths start from the same weights)."""

    losses: Callable
    aligner: torch.nn.Module
    optimizer: torch.optim.Optimizer


@dataclass
class Setup:
    device: torch.device
    autocast: Callable
    shape: dict
    width: int
    peak_tflops: float
    seed: int


def train_step(path: StepPath, batch: dict, setup: Setup) -> None:
    """Forward, backward and the AdamW update of the aligner (token-mean loss, as the reference step trained)."""
    with setup.autocast():
        loss_sum, count = path.losses(path.aligner, batch)
        loss = loss_sum / count
    loss.backward()
    path.optimizer.step()
    path.optimizer.zero_grad(set_to_none=True)


def loss_and_gradient(losses: Callable, aligner, batch: dict, setup: Setup) -> tuple[float, torch.Tensor]:
    """The token-mean loss and the aligner's gradient, without an update (the weights stay as they are)."""
    with setup.autocast():
        loss_sum, count = losses(aligner, batch)
        loss = loss_sum / count
    loss.backward()
    gradient = torch.cat([parameter.grad.flatten() for parameter in aligner.parameters()])
    aligner.zero_grad(set_to_none=True)
    return loss.item(), gradient


def timed(function: Callable, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def measured_peak(device: torch.device) -> tuple[float, dict]:
    """TFLOP/s of a large matmul: bf16 8192^3 on a GPU timed with CUDA events (best of 3 runs of 20), fp32 on a CPU."""
    size, dtype, iterations = (8192, torch.bfloat16, 20) if device.type == "cuda" else (512, torch.float32, 5)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iterations):
                torch.mm(a, b, out=out)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            seconds = timed(lambda: [torch.mm(a, b, out=out) for _ in range(iterations)], device)
        best = min(best, seconds)
    return 2 * size**3 * iterations / best / 1e12, {"size": size, "dtype": str(dtype).removeprefix("torch.")}


def peak_memory_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"].get("unique_graphs", 0)


# --- counting -----------------------------------------------------------------------------------------------------


def sample_flops(prefix: int, target: int, shape: dict, width: int) -> float:
    """Matrix-product FLOPs of one sample's training step (FLOPS_FORMULA)."""
    s, t, layers = prefix, target, shape["num_decoder_layers"]
    d, i, f, vocab = shape["d_model"], shape["num_heads"] * shape["d_kv"], shape["d_ff"], shape["vocab_size"]
    linear, attention, head = 2 * t * d * (6 * i + 3 * f) + 2 * s * d * 2 * i, 4 * t * (t + s) * i, 2 * t * d * vocab
    decoder_forward = layers * (linear + attention) + head
    decoder_backward = layers * (linear + 2 * attention) - (8 * t * d * i + 8 * t * t * i) + head
    aligner_forward = 2 * s * (width * d + d * d)
    aligner_backward = 2 * s * width * d + 4 * s * d * d  # both weight gradients, the second layer's input gradient
    return decoder_forward + decoder_backward + aligner_forward + aligner_backward


def batch_flops(lengths: list[tuple[int, int]], shape: dict, width: int, multiple: int | None = None) -> float:
    """FLOPs of a batch: of its real tokens, or (multiple given) of its padded shape, as the step executes it."""
    if multiple is None:
        return sum(sample_flops(prefix, target, shape, width) for prefix, target in lengths)
    padded = [-(-max(column) // multiple) * multiple for column in zip(*lengths)]
    return len(lengths) * sample_flops(*padded, shape, width)


def padding(batches: list[list[tuple[int, int]]], multiple: int, shape: dict, width: int) -> dict:
    """Share of the token slots that are padding on each side, and of the step's FLOPs spent on padding."""
    real = [sum(column) for column in zip(*(pair for batch in batches for pair in batch))]
    slots = [0, 0]
    for batch in batches:
        for side, column in enumerate(zip(*batch)):
            slots[side] += len(batch) * -(-max(column) // multiple) * multiple
    useful = sum(batch_flops(batch, shape, width) for batch in batches)
    executed = sum(batch_flops(batch, shape, width, multiple) for batch in batches)
    return {
        "encoder": round(1 - real[0] / slots[0], 4),
        "decoder": round(1 - real[1] / slots[1], 4),
        "work": round(1 - useful / executed, 4),
    }


def rates(seconds: float, samples: int, flops: float, peak_tflops: float) -> dict:
    return {
        "samples_per_s": round(samples / seconds, 2),
        "tflops": round(flops / seconds / 1e12, 3),
        "fraction_of_peak": round(flops / seconds / 1e12 / peak_tflops, 4),
    }


# --- the two runs -----------------------------------------------------------------------------------------------------


def time_reference_shapes(path: StepPath, batch: dict, repeats: int, setup: Setup) -> tuple[float, float | None]:
    """(mean step time, peak memory in GiB) on the reference batch, after one warm-up step. The steps run back to
    back with one synchronisation around them all, as in training: the CPU queues a step while the GPU runs the last,
    so a step that makes the host wait for the device shows up as slower."""
    train_step(path, batch, setup)
    reset_peak_memory(setup.device)
    seconds = timed(lambda: [train_step(path, batch, setup) for _ in range(repeats)], setup.device)
    return seconds / repeats, peak_memory_gib(setup.device)


def time_mix(path: StepPath, batches: list, multiple: int, count: int, warmup: int, setup: Setup) -> dict:
    """Time `count` batches of a length-mix order after `warmup` untimed ones (kernels, shapes)."""
    shape, width = setup.shape, setup.width

    def staged(number: int, lengths) -> dict:
        return to_device(make_batch(lengths, width, shape["vocab_size"], multiple, setup.seed + number), setup.device)

    for number, lengths in enumerate(batches[:warmup]):
        train_step(path, staged(number, lengths), setup)
    graphs = compiled_graphs()
    # Batches staged on the device beforehand, then the steps back to back with one synchronisation (as above).
    ready = [staged(warmup + number, lengths) for number, lengths in enumerate(batches[warmup : warmup + count])]
    seconds = timed(lambda: [train_step(path, batch, setup) for batch in ready], setup.device)
    timed_batches = batches[warmup : warmup + count]
    executed = sum(batch_flops(lengths, shape, width, multiple) for lengths in timed_batches)
    useful = sum(batch_flops(lengths, shape, width) for lengths in timed_batches)
    # The projection takes the whole window's FLOPs per sample at the measured rate: less noisy than the lengths of
    # the few batches timed, which are a random draw.
    window_executed = sum(batch_flops(lengths, shape, width, multiple) for lengths in batches)
    samples = sum(len(lengths) for lengths in batches)
    seconds_per_sample = window_executed / samples / (executed / seconds)
    return {
        **rates(seconds, sum(len(lengths) for lengths in timed_batches), useful, setup.peak_tflops),
        "executed_tflops": round(executed / seconds / 1e12, 3),
        "batches_timed": count,
        "new_graphs_while_timed": compiled_graphs() - graphs,
        "recipe_hours_one_card": round(RECIPE_SAMPLES * seconds_per_sample / 3600, 2),
    }


def length_mix_orders(args, samples: list[tuple[int, int]]) -> dict:
    """One bucketing window of the mix as global batches of lengths: random (padded to the longest, as before) and
    bucketed by training's sampler (train/sampler.py; padded to multiples of pad_to_multiple)."""
    lengths_of = lambda items: [samples[position] for _, position in items]  # noqa: E731
    orders = {}
    for name, lengths, multiple in (("unbucketed", None, 1), ("bucketed", lengths_of, args.pad_to_multiple)):
        sampler = StepSampler(
            len(samples),
            args.batch_size,
            accumulation=1,
            num_processes=1,
            process_index=0,
            seed=args.seed,
            start_step=0,
            max_steps=args.bucket_window,
            lengths=lengths,
            bucket_window=args.bucket_window,
            pad_to_multiple=multiple,
        )
        orders[name] = ([lengths_of(sampler.global_batch(step)) for step in range(args.bucket_window)], multiple)
    return orders


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    shape = {**(TINY_T5 if args.tiny else FLAN_T5_XXL), **({"num_decoder_layers": args.layers} if args.layers else {})}
    width = TINY_VLM_WIDTH if args.tiny else VLM_WIDTH
    repeats, mix_batches = args.repeats or (3 if args.tiny else 10), args.mix_batches or (3 if args.tiny else 12)
    compile_ours = {"auto": device.type == "cuda", "on": True, "off": False}[args.compile]
    bf16 = device.type == "cuda"  # the recipe's precision; fp32 on a CPU, where the two losses must agree to 1e-5
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext
    peak_tflops, peak_setup = measured_peak(device)
    setup = Setup(device, autocast, shape, width, peak_tflops, args.seed)

    t5 = build_t5(shape, device, torch.bfloat16 if bf16 else torch.float32)
    frozen = FrozenModels(t5, TargetCrossEntropy(t5))
    pristine = build_aligner(width, shape["d_model"], device)  # never updated: both steps' loss and gradient on it
    paths = {}
    for name, losses in (
        ("reference", lambda aligner, batch: reference_token_losses(aligner, t5, batch)),
        ("ours", lambda aligner, batch: token_losses(aligner, frozen, batch)),
    ):
        aligner = copy.deepcopy(pristine)
        paths[name] = StepPath(losses, aligner, build_optimizer(aligner, Config(learning_rate=1e-4)))
    reference = [(args.prefix_tokens, args.target_tokens)] * args.batch_size
    reference_batch = to_device(make_batch(reference, width, shape["vocab_size"], 1, args.seed), device)
    reference_flops = batch_flops(reference, shape, width)
    mix = recipe_length_mix(args.bucket_window * args.batch_size, args.seed, tuple(args.generated))
    mix_flops = sum(sample_flops(prefix, target, shape, width) for prefix, target in mix) / len(mix)
    orders = length_mix_orders(args, mix)
    mix_numbers = {
        name: {"padding": padding(batches, multiple, shape, width)} for name, (batches, multiple) in orders.items()
    }

    # The reference step first: compiling changes the T5 blocks in place.
    reference_loss, reference_gradient = loss_and_gradient(paths["reference"].losses, pristine, reference_batch, setup)
    reference_time, reference_memory = time_reference_shapes(paths["reference"], reference_batch, repeats, setup)
    mix_numbers["unbucketed"]["reference"] = time_mix(paths["reference"], *orders["unbucketed"], mix_batches, 1, setup)
    if compile_ours:
        compile_frozen_models(frozen, args.compile_backend)
    first_call = timed(lambda: loss_and_gradient(paths["ours"].losses, pristine, reference_batch, setup), device)
    our_loss, our_gradient = loss_and_gradient(paths["ours"].losses, pristine, reference_batch, setup)
    our_time, our_memory = time_reference_shapes(paths["ours"], reference_batch, repeats, setup)
    mix_numbers["bucketed"]["ours"] = time_mix(paths["ours"], *orders["bucketed"], mix_batches, 2, setup)
    hours_at_75_percent = RECIPE_SAMPLES * mix_flops / (0.75 * peak_tflops * 1e12) / 3600

    result = {
        "bench": "train_step",
        **environment(device),
        "shapes": {
            "model": "tiny T5" if args.tiny else "flan-T5-XXL decoder (random weights)",
            **shape,
            "feed_forward": "gated-gelu",
            "aligner": f"{width} -> {shape['d_model']}",
            "batch_size": args.batch_size,
            "prefix_tokens": args.prefix_tokens,
            "target_tokens": args.target_tokens,
            "precision": "T5 bf16, aligner fp32 under bf16 autocast" if bf16 else "fp32",
        },
        "measured_peak_tflops": round(peak_tflops, 2),
        "peak_matmul": peak_setup,
        "flops_formula": FLOPS_FORMULA,
        "reference_shape_step_tflop": round(reference_flops / 1e12, 4),
        "reference": {
            "step_ms": round(reference_time * 1000, 2),
            **rates(reference_time, args.batch_size, reference_flops, peak_tflops),
            "peak_memory_gib": reference_memory,
        },
        "ours": {
            "compile": compile_ours,
            "step_ms": round(our_time * 1000, 2),
            **rates(our_time, args.batch_size, reference_flops, peak_tflops),
            "peak_memory_gib": our_memory,
            "first_call_s": round(first_call, 2),
        },
        "speedup": round(reference_time / our_time, 3),
        "loss": {"reference": reference_loss, "ours": our_loss},
        "loss_abs_difference": abs(reference_loss - our_loss),
        "gradient_relative_difference": ((our_gradient - reference_gradient).norm() / reference_gradient.norm()).item(),
        "length_mix": {
            "samples": len(mix),
            "generated_tokens": args.generated,
            "prefix": "s as training draws it: uniform in 1..min(L - 1, 128)",
            "target": "min(L - s, 127) + 1 tokens (one T5 token per VLM token assumed, </s> added)",
            "useful_gflop_per_sample": round(mix_flops / 1e9, 3),
            "bucket_window_steps": args.bucket_window,
            "pad_to_multiple": args.pad_to_multiple,
            # the share of the executed FLOPs spent on padding; per side (token slots) under unbucketed/bucketed
            "padding_fraction_bucketed": mix_numbers["bucketed"]["padding"]["work"],
            "padding_fraction_unbucketed": mix_numbers["unbucketed"]["padding"]["work"],
            **mix_numbers,
        },
        "projection": {
            "recipe_samples": RECIPE_SAMPLES,
            "hours_for_3_2m_samples": mix_numbers["bucketed"]["ours"]["recipe_hours_one_card"],
            "how": "one card; the bucketed window's executed FLOPs per sample at our executed TFLOP/s on the length "
            "mix; cached features, data loading not included",
            # for scale: the mix's real work at 75% of the measured peak, and 64 + 64 samples' (the reference shapes)
            "hours_at_75_percent_of_peak": round(hours_at_75_percent, 2),
            "reference_shape_hours_at_75_percent_of_peak": round(
                RECIPE_SAMPLES * reference_flops / args.batch_size / (0.75 * peak_tflops * 1e12) / 3600, 2
            ),
        },
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
