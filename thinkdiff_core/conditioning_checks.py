"""Checks on what reaches the conditioning node: the VLM or vision features against the aligner, and the base
CONDITIONING (type, shape, dtype, device, finite values, pooled vector, attention mask, guidance). Each refusal is one
ThinkDiffError line naming the cause and the fix; NaN/inf are blamed on where they arose (the VLM, the aligner,
`strength` or the text encoder upstream)."""

from __future__ import annotations

import math

import torch

from .aligner import ThinkDiffAligner
from .errors import AlignerMismatchError, FeatureError
from .vlm import VlmFeatures


def check_aligner_fits(
    aligner: ThinkDiffAligner, width: int, variant: str, source: str = "", model_type: str = ""
) -> None:
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
    trained_type, given_type = spec.vlm_model_type, model_type
    if variant == "lvlm" and trained_type and given_type and trained_type != given_type:
        raise AlignerMismatchError(
            f"the aligner was trained on a '{trained_type}' VLM{f' ({spec.source_model})' if spec.source_model else ''}, "
            f"but the features come from a '{given_type}' one{f' ({source})' if source else ''}: same width, other "
            f"hidden states. Load the VLM it was trained on (Qwen2-VL-7B-Instruct for the released aligner), or an "
            f"aligner trained for this VLM."
        )
    if spec.input_dim != width:
        trained_on = f" (trained on {spec.source_model})" if spec.source_model else ""
        raise AlignerMismatchError(
            f"the aligner expects {spec.input_dim}-dim features{trained_on}, but {source or 'the encoder'} gives "
            f"{width}-dim features. Load the aligner trained for this model, or the model it was trained for "
            f"(3584 = Qwen2-VL-7B-Instruct for the released LVLM aligner, 1408 = BLIP-2's vision tower for the CLIP one)."
        )


VLM_OVERFLOW = "the VLM ran in float16 and overflowed: load it in bfloat16 or float32"


def check_finite(tensor: torch.Tensor, what: str, cause: str = VLM_OVERFLOW) -> None:
    """Refuse NaN/inf in `tensor`; `cause` names where they arose and the fix (the message says 'This usually means
    {cause}.')."""
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise FeatureError(
            f"{what} contain {bad} NaN/inf value(s); they would give the image model a black or noise image. "
            f"This usually means {cause}."
        )


def check_features_fit(aligner: ThinkDiffAligner, features: VlmFeatures) -> None:
    """Refuse features of the wrong type, variant, width or with NaN/inf, before any model is moved or run."""
    if not isinstance(getattr(features, "hidden_states", None), torch.Tensor):
        raise FeatureError(
            f"'features' is a {type(features).__name__}, not ThinkDiff features: connect the output of ThinkDiff VLM "
            f"Encode (LVLM) or ThinkDiff Vision Encode (CLIP)."
        )
    if not isinstance(aligner, ThinkDiffAligner):
        raise AlignerMismatchError(
            f"'aligner' is a {type(aligner).__name__}, not a ThinkDiff aligner: connect ThinkDiff Aligner Loader."
        )
    variant = getattr(features, "variant", "lvlm")
    source = features.source_model or ("the VLM" if variant == "lvlm" else "the vision encoder")
    hidden = features.hidden_states
    if hidden.dim() != 3 or hidden.shape[1] == 0 or hidden.device.type == "meta":
        held = "no tokens" if hidden.dim() == 3 and hidden.shape[1] == 0 else f"shape {tuple(hidden.shape)}"
        held += " on the 'meta' device (never loaded)" if hidden.device.type == "meta" else ""
        raise FeatureError(
            f"the {variant} features hold {held}; the aligner takes (batch, tokens >= 1, width) states: connect the "
            f"output of ThinkDiff VLM Encode (LVLM) or ThinkDiff Vision Encode (CLIP) unchanged."
        )
    lengths = getattr(features, "lengths", None)
    if lengths is not None:
        if (
            not isinstance(lengths, torch.Tensor)
            or lengths.shape != (hidden.shape[0],)
            or lengths.device.type == "meta"
            or not bool(((lengths >= 1) & (lengths <= hidden.shape[1])).all())
        ):
            shown = lengths.tolist() if isinstance(lengths, torch.Tensor) and lengths.device.type != "meta" else lengths
            raise FeatureError(
                f"the {variant} features' lengths {shown} do not fit their batch of {hidden.shape[0]} rows of "
                f"{hidden.shape[1]} tokens (each row needs 1 to {hidden.shape[1]} valid tokens): connect the output of "
                f"ThinkDiff VLM Encode unchanged."
            )
    check_aligner_fits(aligner, hidden.shape[-1], variant, source, getattr(features, "model_type", ""))
    overflow = VLM_OVERFLOW if variant == "lvlm" else VLM_OVERFLOW.replace("the VLM", "the vision encoder")
    check_finite(features.hidden_states, f"the {variant} features", overflow)


def check_base(base: object) -> list:
    """Refuse a base that is not a usable CONDITIONING (wrong type, 2-D tokens, NaN/inf, a pooled vector of the wrong
    batch); returns it as a list of (cond, options) pairs."""
    if not isinstance(base, (list, tuple)) or not all(
        isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict) for entry in base
    ):
        raise FeatureError(
            f"'conditioning' is a {type(base).__name__} that is not a CONDITIONING list of [tokens, options] pairs: "
            f"connect the output of a text encode node (e.g. CLIPTextEncode)."
        )
    for index, (cond, options) in enumerate(base):
        where = f"base conditioning entry {index}"
        if not isinstance(cond, torch.Tensor) or cond.dim() != 3:
            shape = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise FeatureError(
                f"{where} has tokens of shape {shape}; a CONDITIONING holds (batch, tokens, width) tensors. Connect a "
                f"text encode node's output, not a single (tokens, width) tensor."
            )
        _check_tensor_kind(cond, f"the tokens of {where}")
        check_finite(
            cond,
            f"the tokens of {where}",
            "the text encoder upstream overflowed (a T5-XXL run in float16): load it in bfloat16 or float32 "
            "(e.g. t5xxl_fp16.safetensors with weight dtype default, or the fp8 file)",
        )
        _check_options(cond, options, where)
        pooled = options.get("pooled_output")
        if pooled is None:
            continue
        if not isinstance(pooled, torch.Tensor) or pooled.dim() != 2 or pooled.shape[0] not in (1, cond.shape[0]):
            shape = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
            raise FeatureError(
                f"{where} has a pooled_output of shape {shape} for a batch of {cond.shape[0]}; expected "
                f"({cond.shape[0]}, width). Connect a text encode node's output unchanged."
            )
        _check_tensor_kind(pooled, f"the pooled_output of {where}")
        check_finite(pooled, f"the pooled_output of {where}", "the CLIP text encoder upstream overflowed")
    return list(base)


def _check_options(cond: torch.Tensor, options: dict, where: str) -> None:
    """The options this module reads or hands on as they are: guidance a finite number, attention_mask a tensor of
    the entry's batch (its shape is checked against the tokens in extend_mask)."""
    guidance = options.get("guidance")
    if guidance is not None and (
        isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance)
    ):
        raise FeatureError(
            f"{where} has guidance {guidance!r}, not a finite number: set it with FluxGuidance or CLIPTextEncodeFlux "
            f"(3.5 for FLUX.1 dev)."
        )
    mask = options.get("attention_mask")
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dim() < 2 or mask.shape[0] not in (1, cond.shape[0]):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise FeatureError(
            f"{where} has an attention_mask of shape {shape} for a batch of {cond.shape[0]}: connect the text "
            f"encode's output without editing its mask."
        )
    if mask.device.type == "meta" or (mask.is_floating_point() and bool(torch.isnan(mask).any())):
        raise FeatureError(
            f"{where} has an attention_mask with NaN values or on the 'meta' device: connect the text encode's output "
            f"without editing its mask."
        )


def _check_tensor_kind(tensor: torch.Tensor, what: str) -> None:
    """Text encoders give floating point tensors with real values; an integer or boolean tensor, or one on the 'meta'
    device (weights never loaded), is not a text encoding."""
    if tensor.device.type == "meta" or not tensor.is_floating_point():
        kind = "on the 'meta' device (never loaded)" if tensor.device.type == "meta" else f"of dtype {tensor.dtype}"
        raise FeatureError(
            f"{what} are {kind}, not a text encoding: connect a text encode node's output unchanged (ComfyUI gives "
            f"floating point tensors with values)."
        )
