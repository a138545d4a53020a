"""ThinkDiff node classes (ComfyUI V1 API) and their registration."""

import logging
from pathlib import Path

import thinkdiff_core

from . import comfy_adapter
from .conditioning import ThinkDiffConditioning
from .encode import ThinkDiffVLMEncode
from .loaders import ThinkDiffAlignerLoader, ThinkDiffVLMLoader
from .vision import ThinkDiffVisionEncode, ThinkDiffVisionLoader

comfy_adapter.register_model_folders()

_CORE_DIR, _PACK_DIR = Path(thinkdiff_core.__file__).resolve().parent, Path(__file__).resolve().parents[1]
if _CORE_DIR.parent != _PACK_DIR:
    # An installed copy (pip install thinkdiff into ComfyUI's Python) is found first on the import path: the nodes run
    # another version's library without a word.
    logging.getLogger("thinkdiff").warning(
        "ThinkDiff: thinkdiff_core is imported from %s, not from this pack (%s), so the nodes may run another "
        "version's code. Fix: `pip uninstall thinkdiff` in ComfyUI's Python, or `pip install -e` this pack folder.",
        _CORE_DIR,
        _PACK_DIR,
    )

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
