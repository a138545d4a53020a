"""Hostile inputs to the ThinkDiffConditioning node (issue 13, principle 2: node inputs are checked at the node), a
fast sample of the attacks in RELIABILITY.md's "Conditioning-node inputs": each bad input ends in one ThinkDiffError
line that names the real cause and the fix, before the aligner is loaded; the good-but-odd ones give the right
CONDITIONING and never touch the base. Bases are shaped as ComfyUI's own encoders make them (see test_families.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

from nodes import NODE_CLASS_MAPPINGS, comfy_adapter
from thinkdiff_core import VlmFeatures, standin
from thinkdiff_core.errors import AlignerMismatchError, FeatureError, ThinkDiffError

WIDTH = 4096


def managed(model, device="cpu"):
    return comfy_adapter.manage(model, model, torch.device(device))


@pytest.fixture(scope="module")
def aligner():
    return managed(standin.build_aligner(input_dim=24, output_dim=WIDTH, seed=3).eval())


def features(batch=1, tokens=7, hidden=None, lengths=None):
    torch.manual_seed(5)
    hidden = torch.randn(batch, tokens, 24) if hidden is None else hidden
    return VlmFeatures(
        hidden_states=hidden,
        generated_ids=torch.zeros(batch, tokens, dtype=torch.long),
        lengths=torch.tensor([tokens] * batch) if lengths is None else lengths,
        prompt_ids=torch.zeros(batch, 3, dtype=torch.long),
        text=["x"] * batch,
        source_model="tiny-vlm",
    )


def flux(tokens=256, batch=1, **options):
    return [[torch.randn(batch, tokens, WIDTH), {"pooled_output": torch.randn(batch, 768), "guidance": 3.5, **options}]]


def sd3(t5_tokens=77, clip_chunks=1):
    clip = torch.nn.functional.pad(torch.randn(1, 77 * clip_chunks, 2048), (0, WIDTH - 2048))
    return [[torch.cat([clip, torch.randn(1, t5_tokens, WIDTH)], dim=1), {"pooled_output": torch.randn(1, 2048)}]]


def apply(aligner, base, mode="replace", strength=1.0, text_tokens=0, family="auto", feats=None):
    node = NODE_CLASS_MAPPINGS["ThinkDiffConditioning"]()
    return node.apply(aligner, feats if feats is not None else features(), mode, strength, base, text_tokens, family)[0]


def refused(error_type, match, aligner, *args, **kwargs):
    """The node refuses with one line naming the cause; a non-VLM cause is never blamed on the VLM."""
    with pytest.raises(error_type, match=match) as error:
        apply(aligner, *args, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


def with_(base, **options):
    base[0][1].update(options)
    return base


# --- bad inputs: NAMED -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("feats", "match"),
    [
        (features(hidden=torch.randn(7, 24)), r"hold shape \(7, 24\)"),  # used to be a raw RuntimeError
        (features(tokens=0), "hold no tokens"),  # used to give an empty conditioning
        (features(lengths=torch.tensor([0])), r"lengths \[0\] do not fit"),  # used to give all-zero tokens
        (features(lengths=torch.tensor([-1])), r"lengths \[-1\]"),
        (features(lengths=torch.tensor([20])), r"lengths \[20\]"),
        (features(batch=2, lengths=torch.tensor([7])), "batch of 2 rows"),
        (features(hidden=torch.empty(1, 7, 24, device="meta")), "'meta' device"),  # used to be a raw RuntimeError
    ],
    ids=["2-D", "zero-tokens", "length-0", "length-negative", "length-too-long", "lengths-batch", "meta"],
)
def test_malformed_features_are_named(aligner, feats, match):
    refused(FeatureError, match, aligner, flux(), feats=feats)


@pytest.mark.parametrize("strength", [-1.0, 11.0, 1e38])
def test_strength_outside_the_widget_range_is_named(aligner, strength):
    """-1 flipped the tokens, 1e38 gave inf tokens; both passed silently."""
    message = refused(FeatureError, "outside 0 to 10.*set it between 0 and 10", aligner, flux(), strength=strength)
    assert "VLM" not in message


def test_overflow_from_strength_is_blamed_on_strength_not_the_vlm():
    model = standin.build_aligner(input_dim=24, output_dim=WIDTH, seed=3).eval()
    with torch.no_grad():
        model.norm.weight.fill_(3e37)  # finite aligned tokens near float32's limit; x 10 overflows
    message = refused(FeatureError, "times strength 10.0.*lower it", managed(model), flux(), strength=10.0)
    assert "VLM ran in float16" not in message


def test_aligned_tokens_beyond_a_float16_base_are_named():
    """A float16 base: the aligned tokens are cast to it; past 65504 they used to become inf silently."""
    model = standin.build_aligner(input_dim=24, output_dim=WIDTH, seed=3).eval()
    with torch.no_grad():
        model.norm.weight.fill_(3e4)
    base = flux()
    base[0][0] = base[0][0].half()
    refused(FeatureError, "cast to the base's torch.float16.*lower strength", managed(model), base, "append", 10.0)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: [[torch.randint(0, 5, (1, 256, WIDTH)), {"pooled_output": torch.randn(1, 768)}]], "dtype torch.int64"),
        (lambda: [[torch.zeros(1, 256, WIDTH, dtype=torch.bool), {"pooled_output": None}]], "dtype torch.bool"),
        (lambda: [[torch.empty(1, 256, WIDTH, device="meta"), {"pooled_output": None}]], "'meta' device"),
        (lambda: with_(flux(), pooled_output=torch.randint(0, 3, (1, 768))), "pooled_output .*dtype torch.int64"),
        (lambda: with_(flux(), attention_mask=torch.ones(2, 256)), r"attention_mask of shape \(2, 256\) for a batch"),
        (lambda: with_(flux(), attention_mask="mask"), "attention_mask of shape str"),
        (lambda: with_(flux(), attention_mask=torch.full((1, 256), float("nan"))), "attention_mask with NaN"),
        (lambda: with_(flux(), guidance=float("nan")), "guidance nan, not a finite number.*FluxGuidance"),
        (lambda: with_(flux(), guidance="3.5"), "guidance '3.5'"),
    ],
    ids=["int", "bool", "meta", "int-pooled", "mask-batch", "mask-str", "mask-nan", "guidance-nan", "guidance-str"],
)
def test_malformed_base_options_and_dtypes_are_named(aligner, make, match):
    """Each used to pass through (SILENT) or end in a raw AttributeError/RuntimeError."""
    message = refused(FeatureError, match, aligner, make(), "append")
    assert "VLM" not in message


@pytest.mark.parametrize("text_tokens", [10.5, "10", None, -5])
def test_bad_text_tokens_are_named(aligner, text_tokens):
    refused(FeatureError, "text_tokens must be a whole number >= 0", aligner, flux(), "append", text_tokens=text_tokens)


@pytest.mark.parametrize(
    ("mode", "family", "match"), [("insert", "auto", "mode must be"), ("replace", "wan", "family")]
)
def test_unknown_mode_or_family_is_a_thinkdiff_error(aligner, mode, family, match):
    refused(ThinkDiffError, match, aligner, flux(), mode, family=family)


def test_an_aligner_not_made_for_t5xxl_is_named():
    narrow = managed(standin.build_aligner(input_dim=24, output_dim=2048, seed=3).eval())
    refused(AlignerMismatchError, "aligner gives 2048-wide tokens.*T5-XXL's 4096", narrow, None)
    # with a T5-XXL base the aligner is at fault, not the base
    refused(AlignerMismatchError, "aligner gives 2048-wide tokens, but the base conditioning is 4096", narrow, flux())


def test_a_bad_base_fails_before_the_aligner_is_loaded():
    """The aligner's load may evict the image model; a bad base must fail first. (The load device here is 'meta': a
    load would leave the weights there.)"""
    model = standin.build_aligner(input_dim=24, output_dim=WIDTH, seed=3).eval()
    for base in (with_(flux(), guidance=float("nan")), flux(batch=3)):
        refused(FeatureError, "guidance|batch", managed(model, "meta"), base, feats=features(batch=2))
        assert all(parameter.device.type == "cpu" for parameter in model.parameters())


# --- odd but valid inputs: OK ---------------------------------------------------------------------------------


def test_combined_bases_extra_options_and_no_mutation(aligner):
    """ConditioningCombine's entries of different lengths each get the tokens; every option (ControlNet, area,
    Kontext's reference latents, timestep range) is kept; the base is left exactly as it was."""
    control = object()
    base = flux(256) + flux(512)
    base[0][1].update(
        control=control,
        area=(64, 64, 0, 0),
        strength=0.7,
        reference_latents=[torch.zeros(1, 16, 8, 8)],
        start_percent=0.1,
        end_percent=0.9,
        attention_mask=torch.ones(1, 256, dtype=torch.long),
    )
    before = copy.deepcopy([[cond, {k: v for k, v in options.items() if k != "control"}] for cond, options in base])
    out = apply(aligner, base, "prepend", text_tokens=128)
    assert [cond.shape[1] for cond, _ in out] == [7 + 128, 7 + 128]
    options = out[0][1]
    assert options["control"] is control and options["reference_latents"] is base[0][1]["reference_latents"]
    assert (options["area"], options["strength"], options["start_percent"], options["end_percent"]) == (
        (64, 64, 0, 0),
        0.7,
        0.1,
        0.9,
    )
    assert options["attention_mask"].shape == (1, 135) and options is not base[0][1]
    for (cond, opts), (old, old_opts) in zip(base, before):
        assert torch.equal(cond, old) and torch.equal(opts["pooled_output"], old_opts["pooled_output"])
    assert torch.equal(base[0][1]["attention_mask"], before[0][1]["attention_mask"])
    out[0][0].add_(1.0)  # the output owns its storage
    assert torch.equal(base[0][0], before[0][0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_base_keeps_its_dtype_and_device(aligner, dtype):
    base = flux()
    base[0][0] = base[0][0].to(dtype)
    ((cond, _),) = apply(aligner, base, "append")
    assert cond.dtype == dtype and cond.device == comfy_adapter.intermediate_device() and torch.isfinite(cond).all()


def test_sd3_with_only_t5_or_only_clip_or_two_clip_chunks(aligner):
    t5_only = [[torch.randn(1, 77, WIDTH), {"pooled_output": torch.zeros(1, 2048)}]]  # SD3 loaded with T5 only
    assert apply(aligner, t5_only, "append")[0][0].shape == (1, 77 + 7, WIDTH)
    clip_only = [[sd3()[0][0][:, :77], {"pooled_output": torch.randn(1, 2048)}]]  # SD3 loaded without T5
    ((cond, _),) = apply(aligner, clip_only, "append")
    assert cond.shape == (1, 77 + 7, WIDTH) and torch.equal(cond[:, :77], clip_only[0][0])
    long_clip = sd3(clip_chunks=2)  # a long prompt: 154 CLIP tokens, kept whole in front
    ((cond, _),) = apply(aligner, long_clip, "replace")
    assert cond.shape == (1, 154 + 7, WIDTH) and torch.equal(cond[:, :154], long_clip[0][0][:, :154])


def test_a_4096_wide_base_without_pooled_is_read_as_t5_only(aligner):
    """Documented limit: Wan's UMT5-XXL (and LTXV's or Mochi's T5-XXL) CONDITIONING looks like Chroma's/PixArt's
    (4096 wide, pooled None); nothing in it tells them apart, so it is built as Chroma (tokens appended, no options
    added)."""
    wan = [[torch.randn(1, 512, WIDTH), {"pooled_output": None}]]
    ((cond, options),) = apply(aligner, wan, "append")
    assert cond.shape == (1, 519, WIDTH) and options == {"pooled_output": None}
    with pytest.raises(AlignerMismatchError, match="family is 'flux' but the base conditioning is T5-only"):
        apply(aligner, wan, "append", family="flux")
