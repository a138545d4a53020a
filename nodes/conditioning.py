"""The conditioning node: VLM or vision features + aligner (+ optional base conditioning) -> the CONDITIONING of a
T5-XXL model (FLUX.1, SD3/SD3.5, Chroma, PixArt-Sigma)."""

from __future__ import annotations

from thinkdiff_core import align_features
from thinkdiff_core.conditioning import (
    FAMILY_CHOICES,
    PLACEMENTS,
    T5_WIDTH,
    build_conditioning,
    check_features_fit,
    check_inputs,
)
from thinkdiff_core.errors import AlignerMismatchError

from . import comfy_adapter as adapter


class ThinkDiffConditioning:
    DESCRIPTION = (
        "Maps the VLM or vision features through the aligner into T5-XXL space, for any model whose text encoder is "
        "T5-XXL: FLUX.1 (dev, schnell, Krea, Kontext), SD3/SD3.5, Chroma, PixArt-Sigma. replace (the paper): the "
        "aligned tokens take the place of the T5 text tokens; connect an empty-prompt text encode of your model as "
        "'conditioning' (CLIPTextEncodeFlux for FLUX: CLIP-L('') pooled and guidance; CLIPTextEncodeSD3 for SD3.5: "
        "its CLIP-L/G tokens stay in front). append / prepend: the aligned tokens after / before the T5 text tokens. "
        "ThinkDiff-CLIP (image features + your text): prepend, with the text encoded at 128 T5 tokens as in the "
        "paper (T5TokenizerOptions min_length 128 on the text encoder)."
    )
    CATEGORY = "ThinkDiff"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "aligner": ("THINKDIFF_ALIGNER",),
                "features": ("THINKDIFF_FEATURES",),
                "mode": (list(PLACEMENTS), {"default": "replace"}),
                "strength": (
                    "FLOAT",
                    {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": "Scales the aligned tokens."},
                ),
            },
            "optional": {
                "conditioning": (
                    "CONDITIONING",
                    {"tooltip": "Base: its pooled output, guidance and other options are kept, SD3's CLIP tokens too."},
                ),
                "text_tokens": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 4096,
                        "tooltip": "Keep only the first N T5 tokens of the base (0: all). To match the CLIP recipe's "
                        "128 text tokens exactly, encode at 128 with T5TokenizerOptions (min_length 128) instead: "
                        "trimming a 256-token encoding is close, not equal.",
                    },
                ),
                # New inputs go last, so saved workflows' widgets_values still load.
                "family": (
                    list(FAMILY_CHOICES),
                    {
                        "default": "auto",
                        "tooltip": "The model family: auto reads it from 'conditioning' (pooled 768: FLUX.1, 2048: "
                        "SD3, none: Chroma/PixArt); FLUX.1 when there is no base. Chroma and PixArt build the same.",
                    },
                ),
            },
        }

    def apply(self, aligner, features, mode, strength, conditioning=None, text_tokens=0, family="auto"):
        model = getattr(aligner, "model", None)
        if model is None:
            raise AlignerMismatchError(
                f"'aligner' is a {type(aligner).__name__}, not a loaded aligner: connect ThinkDiff Aligner Loader."
            )
        check_features_fit(model, features)  # a wrong pairing fails before the aligner can evict anything
        # So does a bad base, mode, text_tokens or family.
        base, _ = check_inputs(
            model.spec.output_dim, features.hidden_states.shape[0], conditioning, mode, text_tokens, family
        )
        if not base and model.spec.output_dim != T5_WIDTH:
            raise AlignerMismatchError(
                f"the aligner gives {model.spec.output_dim}-wide tokens, but every model this node builds for takes "
                f"T5-XXL's {T5_WIDTH}: load a ThinkDiff aligner made for T5-XXL, e.g. thinkdiff_lvlm or thinkdiff_clip."
            )
        adapter.load_to_device(aligner)  # once: it stays there, under ComfyUI's model management, until evicted
        aligned = align_features(model, features, strength=strength, output_device=adapter.intermediate_device())
        conditioning = build_conditioning(aligned, base=conditioning, mode=mode, text_tokens=text_tokens, family=family)
        return (conditioning,)
