"""Every T5-XXL family's CONDITIONING built through the ThinkDiffConditioning node class, from bases shaped as
ComfyUI's own text encoders make them (comfy/text_encoders/{flux,sd3_clip,pixart_t5}.py, 0.3.64 and 0.33.0), and
the node's refusals of inputs that would otherwise run wrong."""

from __future__ import annotations

import pytest
import torch

from nodes import NODE_CLASS_MAPPINGS, comfy_adapter
from thinkdiff_core import VlmFeatures, standin
from thinkdiff_core.conditioning import FAMILY_CHOICES, sd3_clip_tokens
from thinkdiff_core.errors import AlignerMismatchError, FeatureError

WIDTH, ALIGNED = 4096, 7  # T5-XXL width; aligned tokens per prompt (odd on purpose)


@pytest.fixture(scope="module")
def aligner():
    model = standin.build_aligner(input_dim=24, output_dim=WIDTH, seed=3).eval()
    return comfy_adapter.manage(model, model, torch.device("cpu"))


def features(batch=1, tokens=ALIGNED):
    torch.manual_seed(5)
    return VlmFeatures(
        hidden_states=torch.randn(batch, tokens, 24),
        generated_ids=torch.zeros(batch, tokens, dtype=torch.long),
        lengths=torch.tensor([tokens] * batch),
        prompt_ids=torch.zeros(batch, 3, dtype=torch.long),
        text=["x"] * batch,
        source_model="tiny-vlm",
    )


def flux_base(tokens=256, guidance=3.5):
    """CLIPTextEncodeFlux: T5 tokens (min 256), CLIP-L pooled (1, 768), guidance."""
    options = {"pooled_output": torch.randn(1, 768)}
    if guidance is not None:
        options["guidance"] = guidance
    return [[torch.randn(1, tokens, WIDTH), options]]


def sd3_base(t5_tokens=77, clip_chunks=1, t5_mask=False):
    """CLIPTextEncodeSD3: CLIP-L (768) ++ CLIP-G (1280) states zero-padded to 4096, 77 per chunk, then T5 (min 77);
    pooled (1, 2048); with t5_attention_mask, a mask over the T5 part only."""
    clip = torch.nn.functional.pad(torch.randn(1, 77 * clip_chunks, 2048), (0, WIDTH - 2048))
    options = {"pooled_output": torch.randn(1, 2048)}
    if t5_mask:
        options["attention_mask"] = torch.cat([torch.ones(1, t5_tokens - 3), torch.zeros(1, 3)], dim=1).long()
    return [[torch.cat([clip, torch.randn(1, t5_tokens, WIDTH)], dim=1), options]]


def t5_only_base(tokens=9, mask=False):
    """Chroma / PixArt (pixart_t5.py): unpadded T5 tokens, pooled_output None."""
    options = {"pooled_output": None}
    if mask:
        options["attention_mask"] = torch.ones(1, tokens, dtype=torch.long)
    return [[torch.randn(1, tokens, WIDTH), options]]


def apply(aligner, mode, base, text_tokens=0, family="auto", strength=1.0, feats=None):
    node = NODE_CLASS_MAPPINGS["ThinkDiffConditioning"]()
    return node.apply(aligner, feats or features(), mode, strength, base, text_tokens, family)[0]


def aligned_of(aligner):
    return aligner.model(features().hidden_states).detach()


# --- FLUX.1 --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [3.5, None], ids=["dev-krea-kontext", "schnell-or-disabled"])
def test_flux_every_variant(aligner, guidance):
    base = flux_base(guidance=guidance)
    base[0][1]["reference_latents"] = [torch.zeros(1, 16, 8, 8)]  # Kontext's reference image survives
    ((cond, options),) = apply(aligner, "replace", base)
    torch.testing.assert_close(cond, aligned_of(aligner), atol=1e-5, rtol=1e-5)
    assert options["pooled_output"] is base[0][1]["pooled_output"] and options.get("guidance") == guidance
    assert options["reference_latents"] is base[0][1]["reference_latents"]
    ((cond, _),) = apply(aligner, "prepend", base, text_tokens=128)
    assert cond.shape == (1, ALIGNED + 128, WIDTH) and torch.equal(cond[:, ALIGNED:], base[0][0][:, :128])


def test_flux_redux_joint_mask_is_extended(aligner):
    """StyleModelApply's (B, txt + img, txt + img) bias mask: the aligned tokens get zero bias, the rest is kept."""
    txt, img = 10, 4
    base = flux_base(tokens=txt)
    mask = torch.randn(1, txt + img, txt + img)
    base[0][1].update(attention_mask=mask, attention_mask_img_shape=(2, 2))
    ((cond, options),) = apply(aligner, "append", base)
    new = options["attention_mask"]
    assert cond.shape[1] == txt + ALIGNED and new.shape == (1, txt + ALIGNED + img, txt + ALIGNED + img)
    assert torch.equal(new[:, :txt, :txt], mask[:, :txt, :txt])
    assert torch.equal(new[:, txt + ALIGNED :, txt + ALIGNED :], mask[:, txt:, txt:])
    assert torch.equal(new[:, :txt, txt + ALIGNED :], mask[:, :txt, txt:])
    assert new[:, txt : txt + ALIGNED].abs().sum() == 0 and new[:, :, txt : txt + ALIGNED].abs().sum() == 0
    assert options["attention_mask_img_shape"] == (2, 2)


@pytest.mark.parametrize("mode, text_tokens", [("replace", 0), ("append", 5)])
def test_replace_or_trim_past_redux_tokens_is_refused(aligner, mode, text_tokens):
    """After StyleModelApply the cond holds T5 tokens then Redux tokens, with a joint mask: replace or text_tokens
    would silently drop the Redux tokens, so they are refused with the fix (apply StyleModelApply afterwards)."""
    txt, img = 10, 4
    base = flux_base(tokens=txt)
    base[0][1].update(attention_mask=torch.zeros(1, txt + img, txt + img), attention_mask_img_shape=(2, 2))
    with pytest.raises(FeatureError, match="StyleModelApply.*cannot be told apart.*after ThinkDiff Conditioning"):
        apply(aligner, mode, base, text_tokens=text_tokens)


# --- SD3 / SD3.5 ---------------------------------------------------------------------------------------------------


def test_a_zeroed_out_sd3_base_has_no_clip_block(aligner):
    """ConditioningZeroOut makes every token zero: none of them is a CLIP-L/G block to keep in front (it used to be
    counted as 308 CLIP tokens). A CONDITIONING built at strength 0 reads back the same way."""
    base = sd3_base(t5_tokens=256)
    base = [[torch.zeros_like(base[0][0]), {"pooled_output": torch.zeros(1, 2048)}]]
    assert sd3_clip_tokens(base[0][0]) == 0
    ((cond, _),) = apply(aligner, "replace", base)
    assert cond.shape[1] == ALIGNED
    ((zero, _),) = apply(aligner, "replace", sd3_base(), strength=0.0)
    assert sd3_clip_tokens(zero) == 77


@pytest.mark.parametrize("mode", ["replace", "append", "prepend"])
def test_sd3_keeps_the_clip_block_in_front(aligner, mode):
    base = sd3_base(t5_tokens=77)
    assert sd3_clip_tokens(base[0][0]) == 77
    ((cond, options),) = apply(aligner, mode, base)
    clip, t5 = base[0][0][:, :77], base[0][0][:, 77:]
    assert torch.equal(cond[:, :77], clip) and options["pooled_output"] is base[0][1]["pooled_output"]
    rest = cond[:, 77:]
    expected = {"replace": [ALIGNED, 0], "append": [77, ALIGNED], "prepend": [ALIGNED, 77]}[mode]
    assert rest.shape[1] == sum(expected)
    aligned = aligned_of(aligner)
    if mode == "append":
        assert torch.equal(rest[:, :77], t5)
        torch.testing.assert_close(rest[:, 77:], aligned, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(rest[:, :ALIGNED], aligned, atol=1e-5, rtol=1e-5)
        assert torch.equal(rest[:, ALIGNED:], t5[:, : rest.shape[1] - ALIGNED])


def test_sd3_long_prompt_text_tokens_and_t5_mask(aligner):
    """Two CLIP chunks (a long prompt), text_tokens counting T5 tokens only, and ComfyUI's T5-part mask extended."""
    base = sd3_base(t5_tokens=200, clip_chunks=2, t5_mask=True)
    ((cond, options),) = apply(aligner, "prepend", base, text_tokens=128)
    assert cond.shape[1] == 154 + ALIGNED + 128
    assert torch.equal(cond[:, :154], base[0][0][:, :154])
    assert torch.equal(cond[:, 154 + ALIGNED :], base[0][0][:, 154 : 154 + 128])
    mask = options["attention_mask"]
    assert mask.shape == (1, ALIGNED + 128) and mask[:, :ALIGNED].eq(1).all()
    assert torch.equal(mask[:, ALIGNED:], base[0][1]["attention_mask"][:, :128])


def test_sd3_without_base_is_t5_only_with_zero_pooled(aligner):
    ((cond, options),) = apply(aligner, "replace", None, family="sd3")
    assert cond.shape == (1, ALIGNED, WIDTH) and torch.equal(options["pooled_output"], torch.zeros(1, 2048))
    assert "guidance" not in options


# --- Chroma / PixArt-Sigma -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["auto", "chroma", "pixart"])
def test_t5_only_families(aligner, family):
    base = t5_only_base(tokens=9, mask=True)
    ((cond, options),) = apply(aligner, "append", base, family=family)
    assert cond.shape == (1, 9 + ALIGNED, WIDTH) and torch.equal(cond[:, :9], base[0][0])
    assert options["pooled_output"] is None and "guidance" not in options
    assert torch.equal(options["attention_mask"], torch.ones(1, 9 + ALIGNED, dtype=torch.long))


def test_t5_only_without_mask_gets_none(aligner):
    """ComfyUI's Chroma/PixArt encoders send no mask, and 0.3.64's FLUX-derived Chroma would misread a token mask."""
    ((cond, options),) = apply(aligner, "replace", t5_only_base(), family="chroma")
    assert cond.shape == (1, ALIGNED, WIDTH) and "attention_mask" not in options


# --- refusals ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base, named",
    [
        ([[torch.randn(1, 77, 768), {"pooled_output": torch.randn(1, 768)}]], "SD1.5"),
        ([[torch.randn(1, 77, 2048), {"pooled_output": torch.randn(1, 1280)}]], "SDXL"),
        ([[torch.randn(1, 30, 3584), {"pooled_output": None}]], "Qwen-Image"),
        ([[torch.randn(1, 30, WIDTH), {"pooled_output": torch.randn(1, 1280)}]], "pooled vector is 1280 wide"),
    ],
    ids=["sd15", "sdxl", "qwen-image", "odd-pooled"],
)
def test_a_base_without_t5xxl_names_the_models_that_work(aligner, base, named):
    with pytest.raises(AlignerMismatchError, match=named) as error:
        apply(aligner, "replace", base)
    message = str(error.value)
    assert "FLUX.1" in message and "SD3/SD3.5" in message and "Chroma" in message and "\n" not in message


def test_a_family_that_contradicts_the_base(aligner):
    with pytest.raises(AlignerMismatchError, match="family is 'sd3' but the base conditioning is FLUX.1's"):
        apply(aligner, "replace", flux_base(), family="sd3")
    with pytest.raises(AlignerMismatchError, match="family is 'flux' but .* T5-only"):
        apply(aligner, "replace", t5_only_base(), family="flux")


@pytest.mark.parametrize("where", ["tokens", "pooled"])
def test_non_finite_base_is_blamed_on_the_text_encoder(aligner, where):
    base = flux_base()
    target = base[0][0][0] if where == "tokens" else base[0][1]["pooled_output"]
    target[0, 0] = float("nan")
    with pytest.raises(FeatureError, match="base conditioning entry 0 contain 1 NaN/inf.*text encoder") as error:
        apply(aligner, "replace", base)
    assert "VLM" not in str(error.value)


def test_malformed_bases_are_refused(aligner):
    with pytest.raises(FeatureError, match=r"shape \(256, 4096\).*not a single \(tokens, width\) tensor"):
        apply(aligner, "replace", [[torch.randn(256, WIDTH), {"pooled_output": torch.randn(1, 768)}]])
    with pytest.raises(FeatureError, match=r"pooled_output of shape \(3, 768\) for a batch of 2"):
        apply(aligner, "replace", [[torch.randn(2, 5, WIDTH), {"pooled_output": torch.randn(3, 768)}]])
    with pytest.raises(FeatureError, match="pooled_output of shape \\(768,\\)"):
        apply(aligner, "replace", [[torch.randn(1, 5, WIDTH), {"pooled_output": torch.randn(768)}]])
    with pytest.raises(FeatureError, match="'conditioning' is a Tensor"):
        apply(aligner, "replace", torch.randn(1, 5, WIDTH))
    with pytest.raises(FeatureError, match="mode 'append' got an empty base conditioning"):
        apply(aligner, "append", [])
    with pytest.raises(FeatureError, match="mode 'prepend' needs a base 'conditioning'"):
        apply(aligner, "prepend", None)


def test_wrong_input_types_are_named(aligner):
    node = NODE_CLASS_MAPPINGS["ThinkDiffConditioning"]()
    with pytest.raises(FeatureError, match="'features' is a str.*ThinkDiff VLM Encode"):
        node.apply(aligner, "features", "replace", 1.0)
    with pytest.raises(AlignerMismatchError, match="'aligner' is a str, not a loaded aligner"):
        node.apply("aligner", features(), "replace", 1.0)


# --- saved workflows -----------------------------------------------------------------------------------------------


def test_an_old_workflows_widgets_values_still_load():
    """A workflow saved before `family` existed stores [mode, strength, text_tokens]; the frontend assigns values to
    widgets by position, so the old values land on the same widgets and `family` takes its default."""
    from workflows.build_workflows import input_specs, is_widget

    old_values = ["prepend", 1.0, 128]  # thinkdiff_clip_style.json as committed before this change
    widgets = [(name, spec) for name, spec in input_specs("ThinkDiffConditioning") if is_widget(spec)]
    assert [name for name, _ in widgets[: len(old_values)]] == ["mode", "strength", "text_tokens"]
    loaded = dict(zip([name for name, _ in widgets], old_values))
    for name, spec in widgets[len(old_values) :]:
        loaded[name] = spec[1]["default"]
    assert loaded == {"mode": "prepend", "strength": 1.0, "text_tokens": 128, "family": "auto"}
    assert list(FAMILY_CHOICES)[0] == "auto"
