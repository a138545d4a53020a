"""What the bench scripts share: the real model shapes, the VLM builder, timing, memory and the environment record."""

from __future__ import annotations

import atexit
import gc
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from thinkdiff_core import fast_path, standin
from thinkdiff_core.capture import FinalNormCapture
from thinkdiff_core.fast_decode import FastDecodeOptions
from thinkdiff_core.generation import GenerationSettings
from thinkdiff_core.vlm import model_inputs
from thinkdiff_core.vlm_loader import VlmBundle, load_vlm


def mrope(theta: float, section: list[int]) -> dict:
    """Qwen2-VL's M-RoPE settings as the installed transformers' config takes them: `rope_parameters` on 5.x, the
    released config.json's `rope_theta` + `rope_scaling` on 4.x (which ignores `rope_parameters` and then fails)."""
    import transformers

    from thinkdiff_core.hf_compat import transformers_at_least

    if transformers_at_least(transformers, "5.0.0"):
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta, "mrope_section": section}}
    return {"rope_theta": theta, "rope_scaling": {"type": "mrope", "mrope_section": section}}


QWEN2_VL_TEXT_DIMS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)


def qwen2vl_text(*dims: int, rope_theta: float, mrope_section: list[int]) -> dict:
    """A Qwen2-VL text config of the given QWEN2_VL_TEXT_DIMS (in that order), RMS norm eps 1e-6 and M-RoPE."""
    return {
        **dict(zip(QWEN2_VL_TEXT_DIMS, dims, strict=True)),
        "rms_norm_eps": 1e-6,
        **mrope(rope_theta, mrope_section),
    }


# Qwen/Qwen2-VL-7B-Instruct's config.json, the dims that set the cost.
QWEN2_VL_7B_TEXT = qwen2vl_text(152064, 3584, 18944, 28, 28, 4, 32768, rope_theta=1000000.0, mrope_section=[16, 24, 24])
QWEN2_VL_7B_VISION = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14)


def build_vlm(tiny: bool, device: torch.device, workdir: Path, layers: int | None = None):
    """The stand-in folder gives tokenizer and processor; with real shapes the model is replaced by a random 7B."""
    bundle = load_vlm(standin.build_qwen2vl(workdir / "vlm"), dtype=torch.float32, device=device)
    if tiny:
        return bundle
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = bundle.model.config
    config = Qwen2VLConfig(
        text_config={
            **QWEN2_VL_7B_TEXT,
            **({"num_hidden_layers": layers} if layers else {}),
            "bos_token_id": ids.text_config.bos_token_id,
            "eos_token_id": ids.text_config.eos_token_id,
            "pad_token_id": ids.text_config.pad_token_id,
        },
        vision_config={**QWEN2_VL_7B_VISION, **({"depth": layers} if layers else {})},
        image_token_id=ids.image_token_id,
        video_token_id=ids.video_token_id,
        vision_start_token_id=ids.vision_start_token_id,
        vision_end_token_id=ids.vision_end_token_id,
    )
    generation_config = bundle.model.generation_config
    del bundle.model
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.generation_config = generation_config
    bundle.model = model.eval().requires_grad_(False)
    image_processor = bundle.processor.image_processor
    image_processor.min_pixels, image_processor.max_pixels = 56 * 56, 28 * 28 * 1280  # Qwen2-VL's defaults
    if hasattr(image_processor, "size"):
        image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
    return bundle


def fast_options(args) -> FastDecodeOptions:
    """--compile / --cuda-graphs / --compile-backend as engine options."""
    flag = {"auto": None, "on": True, "off": False}
    return FastDecodeOptions(
        compile=flag[args.compile], cuda_graphs=flag[args.cuda_graphs], compile_backend=args.compile_backend
    )


def add_engine_arguments(parser) -> None:
    parser.add_argument(
        "--compile", choices=("auto", "on", "off"), default="auto", help="compile the decoder layers (auto: on CUDA)"
    )
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (aot_eager checks tracing on CPU quickly)"
    )
    parser.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto")
    parser.add_argument(
        "--warm-caches",
        action="store_true",
        help="keep inductor's and Triton's on-disk caches (first call then shows a warm start)",
    )


def cold_compile_caches(args) -> None:
    """Empty inductor/Triton caches for this process, so the reported first call is a cold start (unless --warm-caches)."""
    if args.warm_caches:
        return
    folder = tempfile.mkdtemp(prefix="thinkdiff-bench-compile-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # compiled kernels are for this run only
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(folder, "inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(folder, "triton")


def timed(function, device: torch.device, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def peak_memory(device: torch.device, function) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    function()
    return torch.cuda.max_memory_allocated(device) / 2**30


def allocated_after_release(vlm, device: torch.device) -> float | None:
    """What stays allocated once the model is offloaded and the engine's buffers released (the node's release)."""
    if device.type != "cuda":
        return None
    vlm.release_device_buffers()
    vlm.model.to("cpu")
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device) / 2**30


def environment(device: torch.device) -> dict:
    """Device, versions and date: every figure is reported with them."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d"),
    }


# --- teacher forcing: both engines judged on the very same tokens -------------------------------------------------


class ForcedChoice:
    """Teacher forcing for comparisons: returns the given tokens step by step, and records what greedy decoding would
    have picked from our own logits and by how much that pick beat the forced token (0 where they agree).

    With `tokens` from another engine's greedy run, `disagreements()` counts the steps where our logits rank
    differently, and `max_margin()` (relative to the top logit's size) says whether all of them are near-ties within
    bf16 rounding (below about 2**-7) or real differences."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens
        self.greedy: list[torch.Tensor] = []
        self.margins: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, index: int) -> torch.Tensor:
        forced = self.tokens[:, index].to(logits.device)
        best = logits.argmax(dim=-1)
        top = logits.gather(1, best[:, None]).squeeze(1)
        self.greedy.append(best)
        # relative to the logit's size: bf16 keeps 8 bits, so margins under ~2**-7 are within its rounding
        self.margins.append((top - logits.gather(1, forced[:, None]).squeeze(1)) / top.abs().clamp_min(1.0))
        return forced

    def disagreements(self) -> int:
        return int((torch.stack(self.greedy, dim=1).cpu() != self.tokens[:, : len(self.greedy)].cpu()).sum())

    def max_margin(self) -> float:
        return float(torch.stack(self.margins).max()) if self.margins else 0.0


def teacher_forced(
    vlm: VlmBundle, conversations: list, settings: GenerationSettings, tokens: torch.Tensor, add_vision_id: bool = False
) -> tuple[ForcedChoice, torch.Tensor, torch.Tensor]:
    """The fast engine fed `tokens` (another engine's greedy output) instead of its own choices.

    Returns the ForcedChoice (our greedy pick and margin at every step), the ids it followed and the final-norm states
    of exactly those tokens, to compare with the other engine's states."""
    inputs = model_inputs(vlm, conversations, add_vision_id=add_vision_id)
    forced = ForcedChoice(tokens)
    capture = FinalNormCapture(vlm.model)
    with torch.inference_mode(), capture:
        ids, states = fast_path.decode(vlm, inputs, settings, forced, capture)
    return forced, ids, states
