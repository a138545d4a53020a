"""ThinkDiff-CLIP nodes: BLIP-2's vision tower (loader) and image encoding into THINKDIFF_FEATURES."""

from __future__ import annotations

import torch

from thinkdiff_core.dtypes import DTYPE_CHOICES
from thinkdiff_core.vision import TOKEN_GRIDS, encode_vision_features, load_vision_encoder

from . import comfy_adapter as adapter
from .loaders import device_and_dtype

MAX_IMAGES = 4


class ThinkDiffVisionLoader:
    DESCRIPTION = (
        "Loads the vision tower of BLIP-2 (Salesforce/blip2-flan-t5-xxl, EVA ViT-g) for ThinkDiff-CLIP: a whole BLIP-2 "
        "folder (only the vision weights are read) or a file made by 'python -m thinkdiff_core extract-vision', "
        "from models/clip_vision or models/thinkdiff."
    )
    CATEGORY = "ThinkDiff"
    RETURN_TYPES = ("THINKDIFF_VISION",)
    RETURN_NAMES = ("vision",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "encoder": (
                    adapter.list_vision_encoders(),
                    {"tooltip": "BLIP-2 folder or extracted vision-tower file."},
                ),
                "dtype": (list(DTYPE_CHOICES), {"default": "auto"}),
                "device": (["auto", "cuda", "cpu"], {"default": "auto"}),
            }
        }

    def load(self, encoder, dtype, device):
        load_device, torch_dtype = device_and_dtype(device, dtype)
        module = load_vision_encoder(
            adapter.vision_encoder_path(encoder), dtype=torch_dtype, device=adapter.offload_device()
        )
        return (adapter.manage(module, module, load_device),)


class ThinkDiffVisionEncode:
    DESCRIPTION = (
        "Encodes one or more images into ThinkDiff-CLIP features: 1 CLS + 8x8 pooled patch tokens = 65 tokens per "
        "image (the recipe), in input order (image_1, image_2, ...; an IMAGE batch counts as several images). "
        "Feed them with a 'clip' aligner to ThinkDiff Conditioning in 'prepend' mode, with your text as conditioning."
    )
    CATEGORY = "ThinkDiff"
    RETURN_TYPES = ("THINKDIFF_FEATURES",)
    RETURN_NAMES = ("features",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vision": ("THINKDIFF_VISION",),
                "image_1": ("IMAGE",),
                "token_grid": (
                    list(TOKEN_GRIDS),
                    {
                        "default": next(iter(TOKEN_GRIDS)),
                        "tooltip": "Patch tokens kept per image. Fewer tokens let the text weigh more; the aligner was trained on 8x8.",
                    },
                ),
            },
            "optional": {f"image_{index}": ("IMAGE",) for index in range(2, MAX_IMAGES + 1)},
        }

    def encode(self, vision, image_1, token_grid, **more_images):
        adapter.require_model(vision, torch.nn.Module, "vision", "ThinkDiff Vision Loader (CLIP)")
        images = [image_1] + [more_images[key] for key in sorted(more_images) if more_images[key] is not None]
        adapter.load_to_device(vision)
        try:
            features = encode_vision_features(vision.model, images, token_grid=token_grid)
        finally:
            adapter.release(vision)
        return (features,)
