"""Conditioning from aligned tokens: modes, copying, refusals, diffusers form (FLUX.1; the other T5-XXL families are
in test_families.py)."""

import pytest
import torch

from thinkdiff_core import (
    AlignerSpec,
    ThinkDiffAligner,
    VlmFeatures,
    align_features,
    build_flux_conditioning,
    to_diffusers_embeds,
)
from thinkdiff_core.errors import AlignerMismatchError, FeatureError


def features(width=24, tokens=5, batch=1, lengths=None):
    torch.manual_seed(1)
    return VlmFeatures(
        hidden_states=torch.randn(batch, tokens, width),
        generated_ids=torch.zeros(batch, tokens, dtype=torch.long),
        lengths=torch.tensor(lengths or [tokens] * batch),
        prompt_ids=torch.zeros(batch, 3, dtype=torch.long),
        text=["x"] * batch,
        source_model="tiny-vlm",
    )


def aligner(width=24, variant="lvlm", out=32):
    torch.manual_seed(0)
    return ThinkDiffAligner(AlignerSpec(variant, width, out, source_model="tiny-vlm")).eval()


def base(tokens=7, width=32):
    return [
        [
            torch.randn(1, tokens, width),
            {"pooled_output": torch.randn(1, 768), "guidance": 2.5, "attention_mask": torch.ones(1, tokens)},
        ]
    ]


def test_align_features_applies_the_aligner_to_every_vector():
    a, f = aligner(), features()
    aligned = align_features(a, f, output_device="cpu")
    torch.testing.assert_close(aligned, a(f.hidden_states))
    torch.testing.assert_close(align_features(a, f, strength=0.5), 0.5 * a(f.hidden_states))


def test_rows_shorter_than_the_batch_are_zero_padded():
    aligned = align_features(aligner(), features(batch=2, lengths=[5, 3]))
    assert aligned[1, 3:].abs().sum() == 0 and aligned[1, :3].abs().sum() > 0 and aligned[0].abs().sum() > 0


@pytest.mark.parametrize("mode, tokens", [("replace", 5), ("append", 12), ("prepend", 12)])
def test_modes_keep_pooled_and_guidance(mode, tokens):
    aligned = torch.randn(1, 5, 32)
    b = base()
    out = build_flux_conditioning(aligned, base=b, mode=mode)
    cond, options = out[0]
    assert cond.shape == (1, tokens, 32)
    assert options["pooled_output"] is b[0][1]["pooled_output"] and options["guidance"] == 2.5
    # the base's token mask is extended to the new token count (ones for the aligned tokens), not dropped
    assert torch.equal(options["attention_mask"], torch.ones(1, tokens))
    if mode == "append":
        assert torch.equal(cond[:, :7], b[0][0]) and torch.equal(cond[:, 7:], aligned)
    if mode == "prepend":
        assert torch.equal(cond[:, :5], aligned) and torch.equal(cond[:, 5:], b[0][0])


def test_base_is_never_modified():
    b = base()
    before_cond, before_keys = b[0][0].clone(), set(b[0][1])
    out = build_flux_conditioning(torch.randn(1, 5, 32), base=b, mode="append")
    assert torch.equal(b[0][0], before_cond) and set(b[0][1]) == before_keys
    assert out[0][1] is not b[0][1] and out is not b


def test_without_base_pooled_is_zero_and_guidance_default():
    cond, options = build_flux_conditioning(torch.randn(2, 5, 32))[0]
    assert cond.shape == (2, 5, 32)
    assert torch.equal(options["pooled_output"], torch.zeros(2, 768)) and options["guidance"] == 3.5


def test_every_base_entry_gets_the_tokens():
    out = build_flux_conditioning(torch.randn(1, 5, 32), base=base() + base(tokens=3), mode="append")
    assert [entry[0].shape[1] for entry in out] == [12, 8]


@pytest.mark.parametrize("mode", ["replace", "append"])
def test_wrong_width_names_the_models_that_work(mode):
    with pytest.raises(AlignerMismatchError, match="768 wide, likely from SD1.5.*FLUX.1 .*SD3/SD3.5.*Chroma"):
        build_flux_conditioning(torch.randn(1, 5, 32), base=base(width=768), mode=mode)


def test_aligner_width_mismatch_names_both_widths():
    with pytest.raises(AlignerMismatchError, match="expects 24-dim features.*gives 40-dim"):
        align_features(aligner(width=24), features(width=40))


def test_clip_aligner_on_vlm_features_is_refused():
    with pytest.raises(AlignerMismatchError, match="'clip' aligner.*Load an 'lvlm' aligner"):
        align_features(aligner(variant="clip"), features())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_never_reach_flux(bad):
    f = features()
    f.hidden_states[0, 2, 3] = bad
    with pytest.raises(FeatureError, match="NaN/inf.*the VLM ran in float16"):
        align_features(aligner(), f)


def test_nan_from_the_aligner_is_blamed_on_the_aligner_not_the_vlm():
    a = aligner()
    with torch.no_grad():
        a.linear_out.weight[0, 0] = float("nan")
    with pytest.raises(FeatureError, match="aligned tokens .the VLM features were finite.*aligner's weights") as error:
        align_features(a, features())
    assert "VLM ran in float16" not in str(error.value)


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), "1.0"])
def test_a_non_finite_strength_is_named(strength):
    with pytest.raises(FeatureError, match="strength must be a finite number"):
        align_features(aligner(), features(), strength=strength)


def test_diffusers_embeds_from_conditioning():
    b = base()
    embeds, pooled = to_diffusers_embeds(build_flux_conditioning(torch.randn(1, 5, 32), base=b))
    assert embeds.shape == (1, 5, 32) and pooled is b[0][1]["pooled_output"]


def test_unknown_mode():
    with pytest.raises(FeatureError, match="mode must be one of"):
        build_flux_conditioning(torch.randn(1, 5, 32), base=base(), mode="sideways")


def test_text_tokens_trims_the_base_padding():
    """ComfyUI pads T5 text to 256 tokens; the CLIP recipe used 128: image tokens first, then 128 text tokens."""
    b = base(tokens=256)
    out = build_flux_conditioning(torch.randn(1, 65, 32), base=b, mode="prepend", text_tokens=128)
    assert out[0][0].shape == (1, 193, 32)
    assert torch.equal(out[0][0][:, 65:], b[0][0][:, :128])
    assert b[0][0].shape == (1, 256, 32)  # the base itself is untouched
