"""Aligned tokens -> FLUX conditioning (ComfyUI CONDITIONING structure, or diffusers prompt embeddings).

A ComfyUI FLUX CONDITIONING is a list of `[cond, options]` pairs: `cond` is (batch, tokens, 4096) in T5-XXL space,
`options["pooled_output"]` is the (batch, 768) CLIP-L pooled vector and `options["guidance"]` the FLUX-dev
distilled guidance. The structure is plain tensors and dicts, so it is built here without ComfyUI.

The paper's LVLM setting (recipe section 10) is mode "replace": FLUX sees only the aligned tokens, with the pooled
vector of CLIP-L("") taken from the base conditioning (wire an empty-prompt text encode into it).
"""

from __future__ import annotations

import torch

from .aligner import ThinkDiffAligner
from .errors import AlignerMismatchError, FeatureError
from .vlm import VlmFeatures

PLACEMENTS = ("replace", "append", "prepend")  # where the aligned tokens go relative to the base's tokens
POOLED_WIDTH = 768  # CLIP-L pooled width FLUX.1 expects
DEFAULT_GUIDANCE = 3.5  # recipe section 10


def check_aligner_fits(aligner: ThinkDiffAligner, width: int, variant: str, source: str = "") -> None:
    """Refuse features the aligner was not made for, saying which aligner to load instead."""
    spec = aligner.spec
    if spec.variant != variant:
        wanted = (
            "an 'lvlm' aligner (e.g. thinkdiff_lvlm)" if variant == "lvlm" else "a 'clip' aligner (e.g. thinkdiff_clip)"
        )
        raise AlignerMismatchError(
            f"this is a '{spec.variant}' aligner, but the features come from "
            f"{'a VLM' if variant == 'lvlm' else 'a vision encoder'}{f' ({source})' if source else ''}. Load {wanted}."
        )
    if spec.input_dim != width:
        trained_on = f" (trained on {spec.source_model})" if spec.source_model else ""
        raise AlignerMismatchError(
            f"the aligner expects {spec.input_dim}-dim features{trained_on}, but {source or 'the encoder'} gives "
            f"{width}-dim features. Load the aligner trained for this model, or the model it was trained for "
            f"(3584 = Qwen2-VL-7B-Instruct for the released LVLM aligner, 1408 = BLIP-2's vision tower for the CLIP one)."
        )


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise FeatureError(
            f"{what} contain {bad} NaN/inf value(s); they would give FLUX a black or noise image. This usually means "
            f"the VLM ran in float16 and overflowed: load it in bfloat16 or float32."
        )


def check_features_fit(aligner: ThinkDiffAligner, features: VlmFeatures) -> None:
    """Refuse features of the wrong variant, width or with NaN/inf, before any model is moved or run."""
    variant = getattr(features, "variant", "lvlm")
    source = features.source_model or ("the VLM" if variant == "lvlm" else "the vision encoder")
    check_aligner_fits(aligner, features.hidden_states.shape[-1], variant, source)
    check_finite(features.hidden_states, f"the {variant} features")


def align_features(
    aligner: ThinkDiffAligner,
    features: VlmFeatures,
    *,
    strength: float = 1.0,
    output_device: torch.device | str | None = None,
) -> torch.Tensor:
    """Run the aligner over the features: (batch, tokens, input_dim) -> (batch, tokens, output_dim) float32.

    `features` is a VlmFeatures (variant "lvlm") or a vision encoder's features (variant "clip"); the aligner must
    be of the same variant and width. It runs where its weights are (the caller places it once; it is never moved
    here), and the result goes to `output_device` (default: the aligner's device): in ComfyUI, where its own text
    encoders put conditioning. Rows shorter than the batch (generation stopped at EOS) are zero-padded after
    alignment.
    """
    check_features_fit(aligner, features)
    parameter = next(aligner.parameters())
    with torch.inference_mode():
        aligned = aligner(features.hidden_states.to(device=parameter.device, dtype=parameter.dtype)).float() * strength
        lengths = getattr(features, "lengths", None)
        if lengths is not None:
            valid = torch.arange(aligned.shape[1], device=aligned.device)[None, :] < lengths.to(aligned.device)[:, None]
            aligned = aligned * valid[..., None]
    check_finite(aligned, "the aligned tokens")
    # A plain tensor again (not an inference tensor), so later in-place edits downstream are allowed.
    return aligned.to(output_device if output_device is not None else aligned.device).clone()


def build_flux_conditioning(
    aligned: torch.Tensor,
    base: list | None = None,
    mode: str = "replace",
    guidance: float | None = DEFAULT_GUIDANCE,
    text_tokens: int = 0,
) -> list[list]:
    """A FLUX CONDITIONING from aligned tokens (batch, tokens, 4096) and an optional base conditioning.

    replace: only the aligned tokens; the base's pooled output, guidance and other options are kept.
    append / prepend: the aligned tokens after / before each base entry's tokens.
    Without a base the pooled output is zeros (legal in ComfyUI, but the recipe uses CLIP-L("")) and guidance is
    `guidance`. Never modifies `base`: new lists, copied option dicts.
    text_tokens > 0 keeps only the first text_tokens tokens of each base entry: ComfyUI pads T5 text to at least
    256 tokens, the official ThinkDiff-CLIP inference to 128 (recipe section 10), so 128 reproduces the recipe.
    """
    if mode not in PLACEMENTS:
        raise ValueError(f"mode must be one of {PLACEMENTS}, got {mode!r}")
    if aligned.dim() != 3:
        raise FeatureError(f"aligned tokens must be (batch, tokens, width), got shape {tuple(aligned.shape)}")
    if not base:
        options = {"pooled_output": torch.zeros(aligned.shape[0], POOLED_WIDTH)}
        if guidance is not None:
            options["guidance"] = guidance
        base = [[aligned.new_zeros(aligned.shape[0], 0, aligned.shape[2]), options]]
        mode = "replace"
    out = []
    for cond, options in base:
        if mode != "replace" and cond.shape[-1] != aligned.shape[-1]:
            raise AlignerMismatchError(
                f"cannot {mode} {aligned.shape[-1]}-wide aligned tokens to a {cond.shape[-1]}-wide conditioning: "
                f"the base must come from FLUX's text encoder (T5-XXL, 4096 wide)."
            )
        if text_tokens > 0:
            cond = cond[:, :text_tokens]
        tokens = _match_batch(aligned, cond.shape[0]).to(cond.dtype if cond.is_floating_point() else aligned.dtype)
        if mode == "append":
            tokens = torch.cat([cond, tokens.to(cond.device)], dim=1)
        elif mode == "prepend":
            tokens = torch.cat([tokens.to(cond.device), cond], dim=1)
        new_options = dict(options)
        # A mask sized for the old token count would be wrong now; FLUX runs without one (as for plain T5 text).
        new_options.pop("attention_mask", None)
        out.append([tokens, new_options])
    return out


def to_diffusers_embeds(conditioning: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The first CONDITIONING entry as diffusers FluxPipeline (`prompt_embeds`, `pooled_prompt_embeds`)."""
    cond, options = conditioning[0]
    pooled = options.get("pooled_output")
    if pooled is None:
        pooled = torch.zeros(cond.shape[0], POOLED_WIDTH)
    return cond, pooled


def _match_batch(tokens: torch.Tensor, batch: int) -> torch.Tensor:
    if tokens.shape[0] == batch:
        return tokens
    if tokens.shape[0] == 1:
        return tokens.expand(batch, -1, -1)
    raise FeatureError(
        f"features have batch {tokens.shape[0]} but the base conditioning has batch {batch}; use one of each or equal batches."
    )
