"""The conditioning node: VLM features + aligner (+ optional base conditioning) -> FLUX CONDITIONING."""

from __future__ import annotations

from thinkdiff_core import align_features, build_flux_conditioning
from thinkdiff_core.conditioning import MODES

from . import comfy_adapter as adapter


class ThinkDiffConditioning:
    DESCRIPTION = (
        "Maps the VLM features through the aligner into FLUX's T5 space. replace (the paper): FLUX sees only the "
        "aligned tokens; connect an empty-prompt CLIPTextEncodeFlux as 'conditioning' to supply CLIP-L('') pooled and "
        "guidance. append / prepend: the aligned tokens after / before the text tokens of 'conditioning'."
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
                "mode": (list(MODES), {"default": "replace"}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": "Scales the aligned tokens."}),
            },
            "optional": {"conditioning": ("CONDITIONING", {"tooltip": "Base: pooled output and guidance are kept from it."})},
        }

    def apply(self, aligner, features, mode, strength, conditioning=None):
        aligned = align_features(aligner, features, device=adapter.compute_device(), strength=strength)
        return (build_flux_conditioning(aligned, base=conditioning, mode=mode),)
