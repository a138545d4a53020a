"""ThinkDiff core library: aligner, checkpoints, VLM feature capture and FLUX conditioning.

Imports torch and safetensors only; transformers and diffusers are imported where they are used. Nothing here
imports ComfyUI.
"""

from .aligner import AlignerSpec, ThinkDiffAligner, init_norm_from_t5
from .checkpoints import convert_official, load_aligner, read_metadata, save_aligner
from .conditioning import align_features, build_flux_conditioning, to_diffusers_embeds
from .errors import ThinkDiffError
from .generation import GenerationSettings
from .prompts import cobsat_content, interleaved_content
from .vlm import VlmFeatures, encode_with_vlm
from .vlm_loader import load_vlm

__all__ = [
    "AlignerSpec",
    "GenerationSettings",
    "ThinkDiffAligner",
    "ThinkDiffError",
    "VlmFeatures",
    "align_features",
    "build_flux_conditioning",
    "cobsat_content",
    "convert_official",
    "encode_with_vlm",
    "init_norm_from_t5",
    "interleaved_content",
    "load_aligner",
    "load_vlm",
    "read_metadata",
    "save_aligner",
    "to_diffusers_embeds",
]
