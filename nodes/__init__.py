"""ThinkDiff node classes (ComfyUI V1 API) and their registration."""

from . import comfy_adapter
from .conditioning import ThinkDiffConditioning
from .encode import ThinkDiffVLMEncode
from .loaders import ThinkDiffAlignerLoader, ThinkDiffVLMLoader
from .vision import ThinkDiffVisionEncode, ThinkDiffVisionLoader

comfy_adapter.register_model_folders()

NODE_CLASS_MAPPINGS = {
    "ThinkDiffVLMLoader": ThinkDiffVLMLoader,
    "ThinkDiffAlignerLoader": ThinkDiffAlignerLoader,
    "ThinkDiffVLMEncode": ThinkDiffVLMEncode,
    "ThinkDiffConditioning": ThinkDiffConditioning,
    "ThinkDiffVisionLoader": ThinkDiffVisionLoader,
    "ThinkDiffVisionEncode": ThinkDiffVisionEncode,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ThinkDiffVLMLoader": "ThinkDiff VLM Loader",
    "ThinkDiffAlignerLoader": "ThinkDiff Aligner Loader",
    "ThinkDiffVLMEncode": "ThinkDiff VLM Encode",
    "ThinkDiffConditioning": "ThinkDiff Conditioning",
    "ThinkDiffVisionLoader": "ThinkDiff Vision Loader (CLIP)",
    "ThinkDiffVisionEncode": "ThinkDiff Vision Encode (CLIP)",
}
