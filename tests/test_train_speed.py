"""Training speed-ups that must not change what is learned: length bucketing (order, resume, padding), the loss on
real target tokens only, and the compiled frozen decoder. Tiny real models on a CPU; kill-and-resume with bucketing on
(the default) is covered by test_reliability_training.py and test_train_distributed.py."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter

import pytest
import torch

from conftest import tiny_overrides
from thinkdiff_core import AlignerSpec, ThinkDiffAligner
from thinkdiff_core.vision import load_vision_encoder
from thinkdiff_train import train_aligner
from thinkdiff_train.config import load_config
from thinkdiff_train.objective import (
    FrozenModels,
    TargetCrossEntropy,
    compile_frozen_models,
    load_frozen_t5,
    token_losses,
)
from thinkdiff_train.sampler import StepSampler
from thinkdiff_train.tasks import build_tasks, collate, draw_split, sample_rng
from thinkdiff_train.train_aligner import build_aligner


def tiny_config(data_dir, config="train/configs/tiny.yaml", **extra):
    """A tiny config pointed at the tiny data, as train_aligner.main would read it from --set arguments."""
    return load_config(config, tiny_overrides(data_dir, **extra)[1::2])  # the KEY=VALUE after each --set


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(data_dir, run_dir, max_steps: int, resume=False, **overrides):
    config = tiny_config(data_dir, output_dir=run_dir, max_steps=max_steps, **overrides)
    return train_aligner.train(config, resume=resume)


def t5_loss(t5, aligned, mask, labels) -> torch.Tensor:
    """The independent reference: transformers' own T5 loss (full logits, mean over labels that are not -100)."""
    from transformers.modeling_outputs import BaseModelOutput

    return t5(encoder_outputs=BaseModelOutput(last_hidden_state=aligned), attention_mask=mask, labels=labels).loss


def mixed_lengths(count: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prefix, target) lengths like the recipe's: L in 128..256, s drawn as training does, targets capped at 128."""
    rng, mix = random.Random(seed), []
    for position in range(count):
        length = rng.randint(128, 256)
        prefix = draw_split(length, sample_rng(seed, 0, position), 128)
        mix.append((prefix, min(length - prefix, 127) + 1))
    return mix


def sampler(mix, **kwargs) -> StepSampler:
    settings = dict(
        num_samples=len(mix),
        batch_size=4,
        accumulation=1,
        num_processes=1,
        process_index=0,
        seed=7,
        start_step=0,
        max_steps=40,
        lengths=lambda items: [mix[position] for _, position in items],
        bucket_window=8,
    )
    return StepSampler(**{**settings, **kwargs})


# --- length bucketing -----------------------------------------------------------------------------------------------


def test_bucketed_order_keeps_each_windows_samples_and_resumes_exactly():
    mix = mixed_lengths(96)  # 96 samples, global batch 8: windows of 8 steps = 64 items, crossing epochs
    one = list(sampler(mix, batch_size=4, accumulation=2))
    plain = list(sampler(mix, batch_size=4, accumulation=2, lengths=None))
    assert one == list(sampler(mix, batch_size=4, accumulation=2))  # deterministic
    for window in range(0, 80, 16):  # 16 micro-batches = 8 steps = one window
        assert Counter(i for b in one[window : window + 16] for i in b) == Counter(
            i for b in plain[window : window + 16] for i in b
        ), "bucketing may regroup a window's samples, never change them"
    assert one != plain
    two = [list(sampler(mix, batch_size=4, num_processes=2, process_index=rank)) for rank in (0, 1)]
    assert one == [batch for pair in zip(*two) for batch in pair]  # 2 processes see what accumulation 2 sees
    for start in (3, 8, 13):  # mid-window, on a window boundary, in a later window
        assert list(sampler(mix, batch_size=4, accumulation=2, start_step=start)) == one[2 * start :]


def test_lengths_are_read_a_steps_share_at_a_time():
    """After the first window, each step reads the lengths of one global batch (of the next window), never a whole
    window at once: the main process feeding the GPU never stalls for long."""
    mix, calls = mixed_lengths(96), []

    def lengths(items):
        calls.append(len(items))
        return [mix[position] for _, position in items]

    order = iter(sampler(mix, lengths=lengths, batch_size=4, max_steps=40))
    per_step = []
    for _ in range(40):
        before = len(calls)
        next(order)
        per_step.append(len(calls) - before)
    assert per_step[0] == 8 + 1  # the first window at once (8 steps' worth), then the next window's first share
    assert per_step[1:] == [1] * 31 + [0] * 8  # one share per step; nothing read ahead for the last window
    assert set(calls) == {4}


def test_bucketing_puts_similar_lengths_together():
    mix = mixed_lengths(4096)
    bucketed = sampler(mix, batch_size=32, bucket_window=128, max_steps=128)
    plain = sampler(mix, batch_size=32, bucket_window=128, max_steps=128, lengths=None)

    def padding(order: StepSampler, multiple: int) -> list[float]:
        slots, real = [0, 0], [0, 0]
        for step in range(128):
            lengths = [mix[position] for _, position in order.global_batch(step)]
            for side, column in enumerate(zip(*lengths)):
                slots[side] += len(lengths) * -(-max(column) // multiple) * multiple
                real[side] += sum(column)
        return [1 - r / s for r, s in zip(real, slots)]

    encoder, decoder = padding(bucketed, 8)
    assert encoder <= 0.10 and decoder <= 0.10, (encoder, decoder)
    plain_encoder, plain_decoder = padding(plain, 1)
    assert plain_encoder > 0.3 and plain_decoder > decoder


@pytest.mark.parametrize("variant", ["lvlm", "lvlm-input", "lvlm-nosplit", "clip"])
def test_lengths_are_those_of_the_items_without_reading_features(tiny_train_data, tiny_features, variant):
    extra = {"lvlm-input": {"feature_source": "input"}, "lvlm-nosplit": {"split": False}}.get(variant, {})
    config = tiny_config(tiny_train_data, f"train/configs/tiny{'_clip' if variant == 'clip' else ''}.yaml", **extra)
    t5, tokenizer = load_frozen_t5(config.t5_path, torch.float32)
    vision = load_vision_encoder(config.vision_path, torch.float32, "cpu") if variant == "clip" else None
    train_set, _, _, _ = build_tasks(config, tokenizer, vision)
    items = [(epoch, position) for epoch in (0, 3) for position in range(len(train_set))]
    for (epoch, position), (encoder, target) in zip(items, train_set.lengths(items)):
        item = train_set[(epoch, position)]
        if item["skipped"]:
            continue  # an unreadable image: the item is the next sample's, the lengths are an estimate
        real_encoder = len(item["features"]) if "features" in item else train_set.image_tokens + len(item["prompt_ids"])
        assert (encoder, target) == (real_encoder, len(item["target_ids"])), (epoch, position)


# --- the loss on real target tokens -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_t5(tiny_train_data):
    t5, _ = load_frozen_t5(str(tiny_train_data / "models" / "t5"), torch.float32)
    t5.encoder = None
    return t5


def padded_batch(pad_to_multiple: int, lengths=((3, 9), (11, 2), (1, 1), (7, 13)), seed: int = 0) -> dict:
    """A collated batch of random 64-wide features and target ids 5, 6, ... </s> of the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    items = [
        {
            "features": torch.randn(prefix, 64, generator=generator),
            "target_ids": [*range(5, 4 + target), 1],
            "skipped": 0,
        }
        for prefix, target in lengths
    ]
    return collate(items, pad_id=0, pad_to_multiple=pad_to_multiple)


@pytest.mark.parametrize("pad_to_multiple", [1, 8])
def test_gathered_loss_equals_t5s_own_loss(tiny_t5, pad_to_multiple):
    aligner = ThinkDiffAligner(AlignerSpec("lvlm", input_dim=64, output_dim=32))
    batch = padded_batch(pad_to_multiple)
    loss_sum, count = token_losses(aligner, FrozenModels(tiny_t5, TargetCrossEntropy(tiny_t5)), batch)
    ours = loss_sum / count
    ours.backward()
    our_gradients = [p.grad.clone() for p in aligner.parameters()]
    aligner.zero_grad()
    reference = t5_loss(tiny_t5, aligner(batch["features"]), batch["feature_mask"], batch["labels"])
    reference.backward()
    assert count == 9 + 2 + 1 + 13
    assert abs(ours.item() - reference.item()) < 1e-5
    for mine, theirs in zip(our_gradients, (p.grad for p in aligner.parameters())):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_the_step_never_asks_the_device_for_a_python_value(tiny_t5, monkeypatch):
    """No host synchronisation inside the loss: on a GPU a `bool(tensor)` or `.item()` there would make the CPU wait
    for every step before queueing the next. transformers asks `mask.all()` of a 2D padding mask, hence the 4D one."""
    aligner = ThinkDiffAligner(AlignerSpec("lvlm", input_dim=64, output_dim=32))
    batch, frozen = padded_batch(8), FrozenModels(tiny_t5, TargetCrossEntropy(tiny_t5))
    asked = []
    for name in ("__bool__", "item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor,
            name,
            lambda self, *a, _name=name, _original=original: asked.append(_name) or _original(self, *a),
        )
    loss_sum, count = token_losses(aligner, frozen, batch)
    (loss_sum / 25).backward()
    monkeypatch.undo()
    assert asked == []


def test_padding_to_a_multiple_pads_with_masked_slots_only():
    plain, padded = padded_batch(1), padded_batch(8)
    assert plain["features"].shape[1] == 11 and padded["features"].shape[1] == 16
    assert padded["labels"].shape[1] == 16 and (padded["labels"][:, 13:] == -100).all()
    assert torch.equal(padded["feature_mask"][:, :11], plain["feature_mask"])
    assert padded["feature_mask"][:, 11:].sum() == 0
    assert torch.equal(padded["labels"].flatten()[padded["target_positions"]], plain["labels"][plain["labels"] != -100])


# --- compile and precision ----------------------------------------------------------------------------------------


@pytest.fixture
def compile_settings_restored():
    """compile_frozen_models sets two process-wide torch settings (right for a training process); undo them after the
    test so that later tests compile as they would alone."""
    import torch.fx.experimental._config as shape_config

    duck_shape, limit = shape_config.use_duck_shape, torch._dynamo.config.recompile_limit
    yield
    shape_config.use_duck_shape, torch._dynamo.config.recompile_limit = duck_shape, limit


def test_compiled_blocks_match_eager_with_one_graph_per_kind_of_block(tiny_t5, compile_settings_restored):
    """Regional compilation on a 3-layer decoder: blocks 1 and 2 reuse one graph, and new lengths compile nothing."""
    from torch._dynamo.utils import counters
    from transformers import T5Config, T5ForConditionalGeneration

    from thinkdiff_core.hf_compat import t5_empty_encoder_layers

    torch.manual_seed(0)
    config = T5Config(
        **{key: tiny_t5.config.to_dict()[key] for key in ("vocab_size", "d_model", "d_ff", "d_kv", "num_heads")},
        num_layers=t5_empty_encoder_layers(),
        num_decoder_layers=3,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
    )
    t5 = T5ForConditionalGeneration(config).eval().requires_grad_(False)
    t5.encoder = None
    aligner = ThinkDiffAligner(AlignerSpec("lvlm", input_dim=64, output_dim=32))
    eager_frozen = FrozenModels(t5, TargetCrossEntropy(t5))
    shapes = [((3, 9), (11, 2), (1, 1), (7, 13)), ((20, 5), (2, 30)), ((5, 6), (4, 4), (9, 2))]
    batches = [padded_batch(multiple, lengths, seed) for seed, (multiple, lengths) in enumerate(zip((8, 1, 8), shapes))]
    expected = []
    for batch in batches:
        loss_sum, count = token_losses(aligner, eager_frozen, batch)
        (loss_sum / count).backward()
        expected.append((loss_sum.item(), aligner.linear_in.weight.grad.clone()))
        aligner.zero_grad()

    before = counters["stats"]["unique_graphs"]
    frozen = FrozenModels(t5, TargetCrossEntropy(t5))
    compile_frozen_models(frozen, backend="aot_eager")
    for batch, (loss, gradient) in zip(batches, expected):
        loss_sum, count = token_losses(aligner, frozen, batch)
        (loss_sum / count).backward()
        assert abs(loss_sum.item() - loss) < 1e-5
        torch.testing.assert_close(aligner.linear_in.weight.grad, gradient, rtol=1e-4, atol=1e-6)
        aligner.zero_grad()
    with torch.no_grad():  # validation: the graphs once more without grad, still none per shape
        token_losses(aligner, frozen, batches[0])
        token_losses(aligner, frozen, batches[2])
    # block 0 (computes the position bias), blocks 1-2, the loss; each with and without grad
    assert counters["stats"]["unique_graphs"] - before <= 6


def test_compiled_training_gives_the_eager_curve(tiny_train_data, tiny_features, tmp_path, compile_settings_restored):
    train(tiny_train_data, tmp_path / "eager", 3, eval_every=3)
    train(tiny_train_data, tmp_path / "compiled", 3, eval_every=3, compile=True, compile_backend="aot_eager")
    for eager, compiled in zip(metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")):
        assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-6)
        assert compiled.get("val_loss", 0) == pytest.approx(eager.get("val_loss", 0), rel=1e-6)


def test_frozen_t5_is_bf16_throughout(tiny_train_data):
    """The recipe's frozen T5 in bf16 has no fp32 weight left (none is cast per step under autocast)."""
    t5, _ = load_frozen_t5(str(tiny_train_data / "models" / "t5"), torch.bfloat16)
    assert {parameter.dtype for parameter in t5.parameters()} == {torch.bfloat16}


# --- what a run logs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bucketing", [True, False])
def test_first_logged_loss_is_t5s_own_loss_on_the_first_batch(tiny_train_data, tiny_features, tmp_path, bucketing):
    """Step 1 logs the loss before any update: T5's own token-mean loss on the sampler's first global batch."""
    train(tiny_train_data, tmp_path, 1, length_bucketing=bucketing, eval_every=0)
    config = tiny_config(tiny_train_data, length_bucketing=bucketing)
    t5, tokenizer = load_frozen_t5(config.t5_path, torch.float32)
    train_set, _, input_dim, _ = build_tasks(config, tokenizer, None)
    aligner = build_aligner(config, input_dim, t5, "tiny")
    order = StepSampler(
        len(train_set),
        config.batch_size,
        accumulation=1,
        num_processes=1,
        process_index=0,
        seed=config.seed,
        start_step=0,
        max_steps=1,
        lengths=train_set.lengths if bucketing else None,
        bucket_window=config.bucket_window,
        pad_to_multiple=config.pad_to_multiple,
    )
    items = [train_set[item] for item in order.global_batch(0)]
    batch = collate(items, tokenizer.pad_token_id, config.pad_to_multiple)
    with torch.no_grad():
        expected = t5_loss(t5, aligner(batch["features"]), batch["feature_mask"], batch["labels"]).item()
    (row,) = metrics(tmp_path)
    assert row["loss"] == pytest.approx(expected, abs=1e-5)
    assert 0 <= row["padding_encoder"] < 1 and 0 <= row["padding_decoder"] < 1 and row["samples_per_s"] > 0


def test_bucketing_lowers_padding_in_a_run(tiny_train_data, tiny_features, tmp_path):
    def mean_padding(run_dir):
        rows = metrics(run_dir)
        return sum(r["padding_encoder"] for r in rows) / len(rows), sum(r["padding_decoder"] for r in rows) / len(rows)

    for bucketing in (True, False):
        train(
            tiny_train_data, tmp_path / str(bucketing), 12, length_bucketing=bucketing, pad_to_multiple=1, eval_every=0
        )
    bucketed, plain = mean_padding(tmp_path / "True"), mean_padding(tmp_path / "False")
    assert bucketed[0] < plain[0] and bucketed[1] < plain[1], (bucketed, plain)


def test_resuming_with_another_data_order_is_refused_unless_allowed(tiny_train_data, tiny_features, tmp_path, caplog):
    from thinkdiff_core.errors import ChangedSettingsError

    train(tiny_train_data, tmp_path, 2, checkpoint_every=2, eval_every=0)
    with pytest.raises(ChangedSettingsError, match=r"length_bucketing True -> False.*--allow-changed-settings"):
        train(tiny_train_data, tmp_path, 3, resume=True, length_bucketing=False, eval_every=0)
    config = tiny_config(tiny_train_data, output_dir=tmp_path, max_steps=3, length_bucketing=False, eval_every=0)
    with caplog.at_level(logging.WARNING, logger="thinkdiff.train"):
        train_aligner.train(config, resume=True, allow_changed_settings=True)
    assert "changed settings (length_bucketing True -> False)" in caplog.text
    assert [row["step"] for row in metrics(tmp_path)][-1] == 3
