"""The conditioning node: VLM features + aligner (+ optional base conditioning) -> FLUX CONDITIONING."""

from __future__ import annotations

from thinkdiff_core import align_features, build_flux_conditioning
from thinkdiff_core.conditioning import PLACEMENTS, check_features_fit

from . import comfy_adapter as adapter


class ThinkDiffConditioning:
    DESCRIPTION = (
        "Maps the VLM features through the aligner into FLUX's T5 space. replace (the paper): FLUX sees only the "
        "aligned tokens; connect an empty-prompt CLIPTextEncodeFlux as 'conditioning' to supply CLIP-L('') pooled and "
        "guidance. append / prepend: the aligned tokens after / before the text tokens of 'conditioning'. "
        "ThinkDiff-CLIP (image features + your text): prepend, with text_tokens 128 as in the paper."
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
                "conditioning": ("CONDITIONING", {"tooltip": "Base: pooled output and guidance are kept from it."}),
                "text_tokens": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 4096,
                        "tooltip": "Keep only the first N tokens of the base (0: all). ComfyUI pads T5 text to 256; the CLIP recipe used 128.",
                    },
                ),
            },
        }

    def apply(self, aligner, features, mode, strength, conditioning=None, text_tokens=0):
        check_features_fit(aligner.model, features)  # a wrong pairing fails before the aligner can evict anything
        adapter.load_to_device(aligner)  # once: it stays there, under ComfyUI's model management, until evicted
        aligned = align_features(
            aligner.model, features, strength=strength, output_device=adapter.intermediate_device()
        )
        return (build_flux_conditioning(aligned, base=conditioning, mode=mode, text_tokens=text_tokens),)
