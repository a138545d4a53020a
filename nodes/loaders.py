"""Loader nodes: the reasoning VLM (a Hugging Face folder under models/LLM) and the aligner (models/thinkdiff)."""

from __future__ import annotations

import torch

from thinkdiff_core import load_aligner, load_vlm
from thinkdiff_core.dtypes import DTYPE_CHOICES, torch_dtype
from thinkdiff_core.vlm_loader import ATTENTION_BACKENDS, ENGINES, QUANTIZATIONS

from . import comfy_adapter as adapter


def device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """The loader widgets' device and dtype; "auto" dtype is bfloat16 where supported."""
    load_device = adapter.compute_device(device)
    return load_device, adapter.default_dtype(load_device) if dtype == "auto" else torch_dtype(dtype)


class ThinkDiffVLMLoader:
    DESCRIPTION = (
        "Loads the reasoning vision-language model (Qwen2-VL-7B-Instruct in the paper) from a Hugging Face folder "
        "in models/LLM. Nothing is downloaded."
    )
    CATEGORY = "ThinkDiff"
    RETURN_TYPES = ("THINKDIFF_VLM",)
    RETURN_NAMES = ("vlm",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (
                    adapter.list_vlm_folders(),
                    {"tooltip": "A model folder (config.json + *.safetensors) in models/LLM."},
                ),
                "dtype": (
                    list(DTYPE_CHOICES),
                    {"default": "auto", "tooltip": "auto: bfloat16 where supported. float16 can overflow."},
                ),
                "device": (["auto", "cuda", "cpu"], {"default": "auto"}),
                "attention": (
                    list(ATTENTION_BACKENDS),
                    {"default": "sdpa", "tooltip": "Falls back to sdpa, then eager, if unavailable."},
                ),
                "trust_remote_code": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Run Python code shipped in the model folder. Only for folders you trust.",
                    },
                ),
                "engine": (
                    list(ENGINES),
                    {
                        "default": "auto",
                        "tooltip": "auto: the fast engine (static cache, compiled, CUDA graphs) on a GPU where it supports the model, else transformers' generate. The first fast run compiles; later runs reuse it while these settings stay.",
                    },
                ),
                "quantization": (
                    list(QUANTIZATIONS),
                    {
                        "default": "none",
                        "tooltip": "8-bit / 4-bit weights (needs bitsandbytes and a CUDA GPU) for 12-16 GB cards. Such a VLM stays on the GPU and decodes with generate.",
                    },
                ),
            }
        }

    def load(self, model, dtype, device, attention, trust_remote_code, engine="auto", quantization="none"):
        load_device, torch_dtype = device_and_dtype(device, dtype)
        quantized = quantization != "none"
        bundle = load_vlm(
            adapter.vlm_path(model),
            dtype=torch_dtype,
            device=load_device if quantized else adapter.offload_device(),
            attn_implementation=attention,
            trust_remote_code=trust_remote_code,
            quantization=quantization,
            engine=engine,
        )
        return (adapter.manage(bundle, bundle.model, load_device, movable=not quantized),)


class ThinkDiffAlignerLoader:
    DESCRIPTION = "Loads a ThinkDiff aligner from models/thinkdiff: this project's .safetensors or the official thinkdiff_lvlm.pth / thinkdiff_clip.pth."
    CATEGORY = "ThinkDiff"
    RETURN_TYPES = ("THINKDIFF_ALIGNER",)
    RETURN_NAMES = ("aligner",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"aligner": (adapter.list_aligners(), {"tooltip": "An aligner file in models/thinkdiff."})}}

    def load(self, aligner):
        model = load_aligner(adapter.aligner_path(aligner), device=adapter.offload_device())
        return (adapter.manage(model, model, adapter.compute_device()),)
