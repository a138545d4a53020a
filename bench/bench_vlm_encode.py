"""Benchmark: ThinkDiff's VLM encoding against plain `generate(output_hidden_states=True)`, same process, same inputs.

    python bench/bench_vlm_encode.py --tiny                  # tiny stand-in on CPU in seconds (CI runs this)
    python bench/bench_vlm_encode.py --device cuda           # Qwen2-VL-7B shapes, random bf16 weights, 2 images, 128 tokens

Prints one JSON object: device, versions, shapes, the median time of each path, tokens/s, the ratio, peak memory, and
whether greedy tokens are identical and features equal (to bf16 tolerance on real shapes). Random weights of the real
shapes are enough to time: no weights are downloaded. Both paths decode greedily, so their work is the same.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinkdiff_core import GenerationSettings, encode_with_vlm, standin  # noqa: E402
from thinkdiff_core.vlm import chat_messages, cobsat_content, load_vlm, prepare_inputs  # noqa: E402

# Qwen/Qwen2-VL-7B-Instruct's config.json, the dims that set the cost.
QWEN2_VL_7B_TEXT = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
)
QWEN2_VL_7B_VISION = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny stand-in model (CPU-friendly)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-tokens", type=int, default=None, help="tokens to generate (default 128; 16 with --tiny)")
    parser.add_argument("--image-size", type=int, default=448, help="side of each of the 2 images (448 -> 256 vision tokens)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None, help="fewer text and vision layers (a quick check of the real-shape path, not a timing)")
    return parser.parse_args(argv)


def build_vlm(tiny: bool, device: torch.device, workdir: Path, layers: int | None = None):
    """The stand-in folder gives tokenizer and processor; with real shapes the model is replaced by a random 7B."""
    bundle = load_vlm(standin.build_qwen2vl(workdir / "vlm"), dtype=torch.float32, device=device)
    if tiny:
        return bundle
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = bundle.model.config
    config = Qwen2VLConfig(
        text_config={**QWEN2_VL_7B_TEXT, **({"num_hidden_layers": layers} if layers else {}), "bos_token_id": ids.text_config.bos_token_id, "eos_token_id": ids.text_config.eos_token_id, "pad_token_id": ids.text_config.pad_token_id},
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


def reference_encode(vlm, messages, num_tokens: int):
    """The plain way: every layer's states for every step, then the last layer picked out (official alignment)."""
    inputs = {k: v.to(vlm.model.device) if isinstance(v, torch.Tensor) else v for k, v in prepare_inputs(vlm, [messages], add_vision_id=True).items()}
    with torch.inference_mode():
        out = vlm.model.generate(
            **inputs,
            max_new_tokens=num_tokens,
            min_new_tokens=num_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            repetition_penalty=1.0,
            suppress_tokens=[vlm.model.config.image_token_id, vlm.model.config.video_token_id, vlm.model.config.vision_start_token_id, vlm.model.config.vision_end_token_id],
            output_hidden_states=True,
            return_dict_in_generate=True,
        )
    states = [out.hidden_states[0][-1][:, -1:]] + [step[-1] for step in out.hidden_states[1:]]
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.cat(states, dim=1)


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


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    num_tokens = args.num_tokens or (16 if args.tiny else 128)
    with tempfile.TemporaryDirectory() as workdir:
        vlm = build_vlm(args.tiny, device, Path(workdir), args.layers)
    size = 56 if args.tiny else args.image_size
    images = [standin.draw_shape_image("red", size=size), standin.draw_shape_image("blue", size=size)]
    messages = chat_messages(cobsat_content(["red", "blue", "green"], images))
    settings = GenerationSettings(num_tokens=num_tokens, greedy=True)

    ours_call = lambda: encode_with_vlm(vlm, messages, settings, add_vision_id=True)  # noqa: E731
    reference_call = lambda: reference_encode(vlm, messages, num_tokens)  # noqa: E731
    ours_call(), reference_call()  # warm-up: kernels, allocator
    ours_time, ours = timed(ours_call, device, args.repeats)
    reference_time, (reference_ids, reference_states) = timed(reference_call, device, args.repeats)
    difference = (ours.hidden_states.float() - reference_states.float()).abs().max().item()
    result = {
        "bench": "vlm_encode",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__, "python": platform.python_version()},
        "shapes": {
            "model": "tiny stand-in" if args.tiny else f"Qwen2-VL-7B (random bf16 weights{f', {args.layers} layers' if args.layers else ''})",
            "prompt_tokens": int(ours.prompt_ids.shape[1]),
            "images": 2,
            "generated_tokens": num_tokens,
        },
        "reference_s": round(reference_time, 4),
        "ours_s": round(ours_time, 4),
        "reference_tokens_per_s": round(num_tokens / reference_time, 1),
        "ours_tokens_per_s": round(num_tokens / ours_time, 1),
        "speedup": round(reference_time / ours_time, 3),
        "peak_memory_gib": {"reference": peak_memory(device, reference_call), "ours": peak_memory(device, ours_call)},
        "tokens_identical": bool(torch.equal(ours.generated_ids.cpu(), reference_ids.cpu())),
        "max_abs_feature_difference": difference,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
