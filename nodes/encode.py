"""The VLM encode node: images + text -> generated text and the generated tokens' final-norm features."""

from __future__ import annotations

from thinkdiff_core import GenerationSettings, encode_with_vlm
from thinkdiff_core.images import pil_images_from_tensor
from thinkdiff_core.prompts import LAYOUTS, chat_messages, layout_content
from thinkdiff_core.vlm_loader import VlmBundle

from . import comfy_adapter as adapter

MAX_IMAGES = 4


class ThinkDiffVLMEncode:
    DESCRIPTION = (
        "The VLM reads the images and text, reasons, and generates tokens; their final-norm states become "
        "THINKDIFF_FEATURES for the ThinkDiff Conditioning node. 'in-context words': one word per line, image k goes "
        "with word k, the last word is the query (e.g. red / blue / green with a red and a blue picture). "
        "'free text': each <image> in the text is replaced by the next image (image_1, image_2, ...); without "
        "markers the images come first. An IMAGE batch counts as several images."
    )
    CATEGORY = "ThinkDiff"
    RETURN_TYPES = ("THINKDIFF_FEATURES", "STRING")
    RETURN_NAMES = ("features", "text")
    OUTPUT_TOOLTIPS = ("Final-norm states of the generated tokens.", "The text the VLM generated.")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vlm": ("THINKDIFF_VLM",),
                "prompt": ("STRING", {"multiline": True, "default": "red\nblue\ngreen"}),
                "layout": (list(LAYOUTS), {"default": LAYOUTS[0]}),
                "num_tokens": (
                    "INT",
                    {
                        "default": 128,
                        "min": 1,
                        "max": 1024,
                        "tooltip": "Tokens to generate = feature vectors (128 in the paper).",
                    },
                ),
                "seed": ("INT", {"default": 42, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
                "temperature": ("FLOAT", {"default": 0.6, "min": 0.01, "max": 2.0, "step": 0.01}),
                "top_p": ("FLOAT", {"default": 0.9, "min": 0.01, "max": 1.0, "step": 0.01}),
                "greedy": ("BOOLEAN", {"default": False, "tooltip": "Argmax decoding instead of sampling."}),
                "keep_model_loaded": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "Off: the VLM leaves the GPU after encoding, making room for FLUX."},
                ),
            },
            "optional": {f"image_{index}": ("IMAGE",) for index in range(1, MAX_IMAGES + 1)},
        }

    def encode(self, vlm, prompt, layout, num_tokens, seed, temperature, top_p, greedy, keep_model_loaded, **images):
        adapter.require_model(vlm, VlmBundle, "vlm", "ThinkDiff VLM Loader")
        pictures = [
            pil
            for key in sorted(images, key=_image_number)
            if images[key] is not None
            for pil in pil_images_from_tensor(images[key])
        ]
        messages = chat_messages(layout_content(layout, prompt, pictures))
        settings = GenerationSettings(
            num_tokens=num_tokens, greedy=greedy, temperature=temperature, top_p=top_p, seed=seed
        )
        adapter.load_to_device(vlm)
        try:
            features = encode_with_vlm(
                vlm.model,
                messages,
                settings,
                on_token=adapter.token_progress(num_tokens),
                add_vision_id=layout == "in-context words",  # "Picture k:" labels as in the official CoBSAT prompt
            ).to(adapter.intermediate_device())  # where ComfyUI keeps its text encoders' outputs
        finally:
            if not keep_model_loaded:
                adapter.release(vlm)
        return {"ui": {"text": features.text[:1]}, "result": (features, features.text[0])}


def _image_number(name: str) -> int:
    return int(name.rsplit("_", 1)[1])
