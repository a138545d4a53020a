"""Aligned tokens -> the CONDITIONING of any diffusion model conditioned on T5-XXL (ComfyUI's structure, or
diffusers prompt embeddings).

A ComfyUI CONDITIONING is a list of `[cond, options]` pairs. What each T5-XXL family carries (read in ComfyUI 0.3.64
and 0.33.0, comfy/text_encoders/{flux,sd3_clip,pixart_t5}.py and comfy/model_base.py):

| family | cond (batch, tokens, 4096) | options |
|---|---|---|
| flux: FLUX.1 dev, schnell, Krea, Kontext | T5 tokens (at least 256; 128 with T5TokenizerOptions) | `pooled_output` (B, 768) CLIP-L; `guidance` (ignored by schnell); Kontext adds `reference_latents` |
| sd3: SD3, SD3.5 Large/Medium/Turbo | CLIP-L ++ CLIP-G token states (77 per chunk, 2048 wide, zero-padded to 4096), then T5 tokens (at least 77) | `pooled_output` (B, 2048) = CLIP-L ++ CLIP-G pooled |
| chroma, pixart: Chroma, PixArt-Sigma | T5 tokens, unpadded | `pooled_output` None |

The aligner's tokens stand in for T5 tokens in every family. replace / append / prepend act on the T5 part: SD3's
CLIP-L/G block is kept in front in every mode (SD3's MMDiT was trained with both streams; the CLIP block of an empty
prompt is what it sees when only T5 carries the prompt), and `text_tokens` trims the T5 part only. The pooled vector
and every other option are kept from the base. An `attention_mask` in the base is extended to the new token count
(token masks (B, tokens): ones for the aligned tokens; FLUX's Redux-style joint bias masks (B, tokens + image,
tokens + image), with image = the reference image's latent tokens): zero bias for them), never dropped. Redux's own
tokens (StyleModelApply) are appended to the T5 tokens in the cond and cannot be told apart from them: with such a
joint mask, replace and text_tokens (which would drop them) are refused; without one (strength_type multiply at 1.0
makes none) they are not detectable, so apply StyleModelApply after this node. ComfyUI's own Chroma/PixArt encoders
send no mask, and none is built here for them (0.3.64's FLUX/Chroma code would read a token mask as an image-shaped
one); the diffusers pipelines that need one (PixArt-Sigma, Chroma) get all-ones from `to_diffusers_embeds`.

Every input is checked before the aligner is loaded (check_features_fit, check_inputs): one ThinkDiffError line
naming the cause and the fix for NaN/inf, wrong shapes, widths, batches, dtypes, 'meta' tensors, masks, guidance,
strength, text_tokens, mode and family. What the checks cannot see: a 4096-wide base whose pooled_output is None is
read as T5-only (Chroma/PixArt), and Wan's UMT5-XXL or LTXV's/Mochi's T5-XXL conditioning looks exactly like that;
HunyuanVideo's (LLaMA 4096 + CLIP-L pooled 768) looks like FLUX.1's. Nothing in a CONDITIONING tells them apart.

The paper's LVLM setting (recipe section 10) is mode "replace" with the pooled vector of an empty prompt taken from
the base conditioning (wire an empty-prompt text encode into it).
"""

from __future__ import annotations

import logging
import math

import torch

from .aligner import ThinkDiffAligner
from .conditioning_checks import check_base, check_features_fit, check_finite
from .errors import AlignerMismatchError, FeatureError
from .vlm import VlmFeatures

logger = logging.getLogger(__name__)

PLACEMENTS = ("replace", "append", "prepend")  # where the aligned tokens go relative to the base's T5 tokens
FAMILIES = ("flux", "sd3", "chroma", "pixart")  # T5-XXL-conditioned model families
FAMILY_CHOICES = ("auto", *FAMILIES)  # auto: from the base conditioning (FLUX.1 when there is none)
POOLED_WIDTHS = {"flux": 768, "sd3": 2048}  # CLIP-L pooled; CLIP-L ++ CLIP-G pooled. Chroma and PixArt: none
POOLED_WIDTH = POOLED_WIDTHS["flux"]
SD3_CLIP_CHUNK = 77  # SD3's CLIP-L/G tokens come in chunks of 77
SD3_CLIP_WIDTH = 768 + 1280  # CLIP-L ++ CLIP-G; ComfyUI zero-pads the rest of the 4096 columns
T5_WIDTH = 4096  # T5-XXL's hidden size: what every supported family's conditioning is wide
MAX_STRENGTH = 10.0  # the node's widget range is 0..10
DEFAULT_GUIDANCE = 3.5  # recipe section 10
WORKING_MODELS = (
    "FLUX.1 (dev, schnell, Krea, Kontext), SD3/SD3.5 (Large, Medium, Turbo), Chroma or PixArt-Sigma, whose text "
    "encoder is T5-XXL"
)
# What a base of another width most likely came from, for the error message.
OTHER_TEXT_ENCODERS = {
    768: "SD1.5 (CLIP-L)",
    1024: "SD2.x (OpenCLIP-H)",
    2048: "SDXL (CLIP-L + CLIP-G) or HunyuanDiT/AuraFlow",
    2304: "Lumina 2 (Gemma 2)",
    2560: "Z-Image (Qwen3-4B)",
    3584: "Qwen-Image (Qwen2.5-VL-7B)",
}


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
    if not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise FeatureError(f"strength must be a finite number, got {strength!r}: set it between 0 and 10.")
    if not 0 <= strength <= MAX_STRENGTH:
        raise FeatureError(
            f"strength is {strength!r}, outside 0 to {MAX_STRENGTH:g} (a negative one flips the tokens, a larger one "
            f"drives the image model out of range): set it between 0 and {MAX_STRENGTH:g}."
        )
    parameter = next(aligner.parameters())
    with torch.inference_mode():
        aligned = aligner(features.hidden_states.to(device=parameter.device, dtype=parameter.dtype)).float()
        # Checked before scaling, so that NaN/inf are blamed on the aligner, not on a finite strength.
        check_finite(
            aligned,
            "the aligned tokens (the VLM features were finite)",
            f"the aligner's weights contain NaN/inf or it overflowed in {parameter.dtype}: re-convert or re-download "
            f"the aligner file and load it in float32",
        )
        aligned = aligned * strength
        check_finite(
            aligned,
            f"the aligned tokens times strength {strength!r} (finite before scaling)",
            "the strength overflowed float32: lower it",
        )
        lengths = getattr(features, "lengths", None)
        if lengths is not None:
            valid = torch.arange(aligned.shape[1], device=aligned.device)[None, :] < lengths.to(aligned.device)[:, None]
            aligned = aligned * valid[..., None]
    # A plain tensor again (not an inference tensor), so later in-place edits downstream are allowed.
    return aligned.to(output_device if output_device is not None else aligned.device).clone()


# --- the base conditioning: checks and family ------------------------------------------------------------------


def detect_family(base: list, width: int) -> str:
    """'flux', 'sd3' or 't5' (Chroma or PixArt: their conditioning is the same) from a checked base, where `width`
    is the aligned tokens' width (T5-XXL's 4096 for the released aligners)."""
    found = set()
    for cond, options in base:
        if cond.shape[-1] != width and cond.shape[-1] == T5_WIDTH:
            raise AlignerMismatchError(
                f"the aligner gives {width}-wide tokens, but the base conditioning is {T5_WIDTH} wide (T5-XXL): load a "
                f"ThinkDiff aligner made for T5-XXL ({T5_WIDTH}-dim output), e.g. thinkdiff_lvlm or thinkdiff_clip."
            )
        if cond.shape[-1] != width:
            source = OTHER_TEXT_ENCODERS.get(cond.shape[-1], f"a {cond.shape[-1]}-wide text encoder")
            raise AlignerMismatchError(
                f"the base conditioning is {cond.shape[-1]} wide, likely from {source}, but the aligned tokens are "
                f"{width} wide (T5-XXL space): connect the text encode of {WORKING_MODELS}."
            )
        pooled = options.get("pooled_output")
        pooled_width = None if pooled is None else pooled.shape[-1]
        family = {None: "t5", **{w: name for name, w in POOLED_WIDTHS.items()}}.get(pooled_width)
        if family is None:
            raise AlignerMismatchError(
                f"the base conditioning's pooled vector is {pooled_width} wide, which no T5-XXL model uses (FLUX.1 768, "
                f"SD3 2048, Chroma and PixArt none): connect the text encode of {WORKING_MODELS}."
            )
        found.add(family)
    if len(found) > 1:
        raise FeatureError(
            f"the base conditioning mixes families ({', '.join(sorted(found))}): combine conditionings of one model."
        )
    return found.pop()


def resolve_family(family: str, base: list | None, width: int) -> str:
    """The family to build for: the widget's choice, checked against what the base shows; 'auto' takes the base's
    (Chroma for a T5-only base, which builds the same conditioning as PixArt) or FLUX.1 without a base."""
    if family not in FAMILY_CHOICES:
        raise FeatureError(
            f"family must be one of {', '.join(FAMILY_CHOICES)}, got {family!r}: pick one in the widget."
        )
    if not base:
        return "flux" if family == "auto" else family
    detected = detect_family(base, width)
    if family == "auto":
        return "chroma" if detected == "t5" else detected
    if (detected == "t5") != (family in ("chroma", "pixart")) or (detected != "t5" and detected != family):
        shown = {"flux": "FLUX.1's (pooled 768)", "sd3": "SD3's (pooled 2048)", "t5": "T5-only (Chroma or PixArt)"}
        raise AlignerMismatchError(
            f"family is '{family}' but the base conditioning is {shown[detected]}: set family to auto, or connect the "
            f"text encode of the model you sample with."
        )
    return family


def sd3_clip_tokens(cond: torch.Tensor) -> int:
    """How many leading tokens of an SD3 conditioning are its CLIP-L/G block: whole 77-token chunks whose columns past
    2048 are zero (ComfyUI's padding; T5 states are never exactly zero there) and whose first 2048 are not all zero
    (CLIP states never are: an all-zero token, as ConditioningZeroOut or strength 0 makes, is not CLIP)."""
    if cond.shape[-1] <= SD3_CLIP_WIDTH:
        return 0
    padded = (cond[..., SD3_CLIP_WIDTH:] == 0).all(dim=-1).all(dim=0)  # (tokens,)
    clip = padded & (cond[..., :SD3_CLIP_WIDTH] != 0).any(dim=-1).any(dim=0)
    run = int(clip.long().cumprod(dim=0).sum().item())
    return run // SD3_CLIP_CHUNK * SD3_CLIP_CHUNK


# --- building ----------------------------------------------------------------------------------------------------


def check_inputs(
    width: int, batch: int, base: object, mode: str, text_tokens: int = 0, family: str = "auto"
) -> tuple[list | None, str]:
    """Every check on the conditioning node's inputs other than the features, for aligned tokens of `width` and
    `batch`: run before the aligner is loaded (which may evict the image model), and again by build_conditioning.
    Returns the base as a list (or None) and the family to build for."""
    if mode not in PLACEMENTS:
        raise FeatureError(f"mode must be one of {', '.join(PLACEMENTS)}, got {mode!r}: pick one in the widget.")
    if isinstance(text_tokens, bool) or not isinstance(text_tokens, int) or text_tokens < 0:
        raise FeatureError(
            f"text_tokens must be a whole number >= 0 (0 keeps every T5 token), got {text_tokens!r}: set it in the widget."
        )
    if base is not None:
        base = check_base(base)
        if not base and mode != "replace":
            raise FeatureError(
                f"mode '{mode}' got an empty base conditioning: connect the text encode whose tokens the aligned "
                f"tokens go {'after' if mode == 'append' else 'before'}, or use mode replace."
            )
    elif mode != "replace":
        raise FeatureError(
            f"mode '{mode}' needs a base 'conditioning' (the text tokens the aligned tokens go "
            f"{'after' if mode == 'append' else 'before'}): connect a text encode, or use mode replace."
        )
    if base:
        for cond, _ in base:
            if batch not in (1, cond.shape[0]):
                raise FeatureError(
                    f"features have batch {batch} but the base conditioning has batch {cond.shape[0]}; use one of "
                    f"each or equal batches."
                )
        masks = [options.get("attention_mask") for _, options in base]
        joint = any(isinstance(mask, torch.Tensor) and mask.dim() == 3 for mask in masks)
        if joint and (mode == "replace" or text_tokens > 0):
            raise FeatureError(
                f"the base conditioning carries a joint text+image attention mask, as StyleModelApply (Redux) leaves it: "
                f"its image tokens sit among the T5 tokens and cannot be told apart, so "
                f"{'mode replace' if mode == 'replace' else 'text_tokens'} would drop them. Apply StyleModelApply after "
                f"ThinkDiff Conditioning instead, or use mode append or prepend with text_tokens 0."
            )
    return base, resolve_family(family, base, width)


def build_conditioning(
    aligned: torch.Tensor,
    base: list | None = None,
    mode: str = "replace",
    guidance: float | None = DEFAULT_GUIDANCE,
    text_tokens: int = 0,
    family: str = "auto",
) -> list[list]:
    """A CONDITIONING for a T5-XXL model from aligned tokens (batch, tokens, 4096) and an optional base.

    replace: the aligned tokens in place of the base's T5 tokens. append / prepend: after / before them. SD3's
    CLIP-L/G block stays in front in every mode; pooled output, guidance and other options are kept; an attention
    mask is extended to the new tokens (see the module docstring). Never modifies `base`: new lists, copied dicts.
    text_tokens > 0 keeps only the first text_tokens T5 tokens of each base entry. For the exact ThinkDiff-CLIP
    recipe encode the text at 128 tokens instead (ComfyUI's T5TokenizerOptions, min_length 128): T5 is
    bidirectional, so trimming a 256-token encoding to 128 is close to, not equal to, encoding at 128.
    Without a base: FLUX.1 gets a zero pooled vector (legal in ComfyUI; the recipe uses CLIP-L("")) and `guidance`,
    SD3 a zero (batch, 2048) pooled vector and no CLIP block (as ComfyUI's SD3 encoder with T5 only), Chroma and
    PixArt the tokens alone.
    """
    if not isinstance(aligned, torch.Tensor) or aligned.dim() != 3:
        shape = tuple(aligned.shape) if isinstance(aligned, torch.Tensor) else type(aligned).__name__
        raise FeatureError(f"aligned tokens must be (batch, tokens, width), got {shape}")
    base, family = check_inputs(aligned.shape[-1], aligned.shape[0], base, mode, text_tokens, family)
    if not base:
        return [[aligned, default_options(family, aligned.shape[0], guidance)]]
    out = []
    for cond, options in base:
        prefix = sd3_clip_tokens(cond) if family == "sd3" else 0
        t5_end = cond.shape[1] if text_tokens <= 0 else min(cond.shape[1], prefix + text_tokens)
        tokens = _match_batch(aligned, cond.shape[0]).to(device=cond.device, dtype=cond.dtype)
        if tokens.dtype != aligned.dtype:
            check_finite(
                tokens,
                f"the aligned tokens cast to the base's {cond.dtype} (finite in {aligned.dtype})",
                f"they exceed {cond.dtype}'s range: lower strength, or run the text encoder in bfloat16 or float32",
            )
        # Where each output token comes from: a base position, or -1 for an aligned token.
        new = torch.full((tokens.shape[1],), -1, dtype=torch.long)
        text = torch.arange(prefix, t5_end)
        order = {"replace": [new], "append": [text, new], "prepend": [new, text]}[mode]
        source = torch.cat([torch.arange(prefix), *order])
        pieces = [cond[:, :prefix]] + [tokens if part is new else cond[:, prefix:t5_end] for part in order]
        new_options = dict(options)
        if options.get("attention_mask") is not None:
            new_options["attention_mask"] = extend_mask(options["attention_mask"], source, cond.shape[1], prefix)
        out.append([torch.cat(pieces, dim=1), new_options])
    return out


def build_flux_conditioning(
    aligned: torch.Tensor,
    base: list | None = None,
    mode: str = "replace",
    guidance: float | None = DEFAULT_GUIDANCE,
    text_tokens: int = 0,
) -> list[list]:
    """build_conditioning for FLUX.1 (the name before other families were supported; the family still comes from
    the base when there is one)."""
    return build_conditioning(aligned, base=base, mode=mode, guidance=guidance, text_tokens=text_tokens)


def default_options(family: str, batch: int, guidance: float | None = DEFAULT_GUIDANCE) -> dict:
    """The options of a CONDITIONING built without a base, as each family's ComfyUI encoder shapes them."""
    if family in POOLED_WIDTHS:
        options = {"pooled_output": torch.zeros(batch, POOLED_WIDTHS[family])}
        if family == "flux" and guidance is not None:
            options["guidance"] = guidance
        return options
    return {"pooled_output": None}  # ComfyUI's T5-only encoders give None; FLUX-derived Chroma reads the key


def extend_mask(mask: torch.Tensor, source: torch.Tensor, base_tokens: int, prefix: int) -> torch.Tensor:
    """The base's attention mask for the new token order `source` (base position per output token, -1 = aligned).

    (B, base_tokens) token mask: its entries, 1/True for the aligned tokens. (B, base_tokens - prefix): an SD3 mask
    over the T5 part only (ComfyUI's t5_attention_mask), kept that way. (B, n, n) with n = base_tokens + image tokens:
    FLUX's joint mask (StyleModelApply); the image part is kept and the aligned tokens get zero bias (or True).
    """
    attend = True if mask.dtype == torch.bool else 1
    if mask.dim() == 2 and mask.shape[1] in (base_tokens, base_tokens - prefix):
        offset = base_tokens - mask.shape[1]
        index = source[prefix if offset else 0 :] - offset
        picked = mask[:, index.clamp(min=0).to(mask.device)]
        return torch.where((index >= 0).to(mask.device)[None, :], picked, torch.full_like(picked, attend))
    if mask.dim() == 3 and mask.shape[1] == mask.shape[2] and mask.shape[1] >= base_tokens:
        image = torch.arange(base_tokens, mask.shape[1])
        index = torch.cat([source, image]).to(mask.device)
        valid = index >= 0
        safe = index.clamp(min=0)
        picked = mask[:, safe[:, None], safe[None, :]]
        keep = valid[:, None] & valid[None, :]
        return torch.where(keep[None], picked, torch.full_like(picked, 0 if mask.dtype != torch.bool else True))
    raise FeatureError(
        f"the base conditioning's attention_mask has shape {tuple(mask.shape)}, which fits neither its {base_tokens} "
        f"tokens nor a joint text+image mask: connect the text encode's output without editing its mask."
    )


def to_diffusers_embeds(conditioning: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The first CONDITIONING entry as diffusers FluxPipeline (`prompt_embeds`, `pooled_prompt_embeds`)."""
    cond, options = conditioning[0]
    pooled = options.get("pooled_output")
    if pooled is None:
        pooled = torch.zeros(cond.shape[0], POOLED_WIDTH)
    return cond, pooled


def token_mask(conditioning: list) -> torch.Tensor:
    """The first entry's (batch, tokens) attention mask for a diffusers pipeline that takes one (PixArt-Sigma,
    Chroma): the base's token mask if it has one covering every token, else all ones."""
    cond, options = conditioning[0]
    mask = options.get("attention_mask")
    if mask is not None and mask.dim() == 2 and mask.shape[1] == cond.shape[1]:
        return mask.long()
    return torch.ones(cond.shape[0], cond.shape[1], dtype=torch.long)


def _match_batch(tokens: torch.Tensor, batch: int) -> torch.Tensor:
    if tokens.shape[0] == batch:
        return tokens
    if tokens.shape[0] == 1:
        return tokens.expand(batch, -1, -1)
    raise FeatureError(
        f"features have batch {tokens.shape[0]} but the base conditioning has batch {batch}; use one of each or equal batches."
    )
