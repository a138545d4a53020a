"""Benchmark: ThinkDiff's VLM encoding (the fast engine) against plain `generate(output_hidden_states=True)`, in the
same process on the same inputs.

    python bench/bench_vlm_encode.py --tiny                  # tiny stand-in on CPU in seconds (CI runs this)
    python bench/bench_vlm_encode.py --device cuda           # Qwen2-VL-7B shapes, random bf16 weights, 2 images, 128 tokens

Prints one JSON object: device, versions, shapes; the median time of the reference, of generate with our final-norm
hook, and of the fast engine; the first call's cost (compile + CUDA graph capture, with empty compile caches unless
--warm-caches) on its own; a call with another prompt length and whether it recompiled; tokens/s and the ratio; peak
memory; whether greedy tokens are identical, where they first differ, and, with our engine fed the reference's tokens
(teacher forcing), whether its greedy picks agree up to bf16 near-ties and its states equal the reference's to bf16
tolerance; and what stays allocated once the model is offloaded and the engine released.
Random weights of the real shapes are enough to time: no weights are downloaded. Every path decodes greedily, so the
work is the same.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from bench_common import (
    add_engine_arguments,
    allocated_after_release,
    build_vlm,
    cold_compile_caches,
    environment,
    fast_options,
    peak_memory,
    teacher_forced,
    timed,
)
from thinkdiff_core import GenerationSettings, encode_with_vlm, standin
from thinkdiff_core.generation import generate_kwargs
from thinkdiff_core.prompts import chat_messages, cobsat_content
from thinkdiff_core.vlm import model_inputs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny stand-in model (CPU-friendly)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-tokens", type=int, default=None, help="tokens to generate (default 128; 16 with --tiny)")
    parser.add_argument(
        "--image-size", type=int, default=448, help="side of each of the 2 images (448 -> 256 vision tokens)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="fewer text and vision layers (a quick check of the real-shape path, not a timing)",
    )
    add_engine_arguments(parser)
    return parser.parse_args(argv)


def reference_encode(vlm, messages, settings: GenerationSettings):
    """The plain way: generate with every layer's states for every step, then the last layer picked out (official
    alignment); the same generation settings as ours."""
    inputs = model_inputs(vlm, [messages], add_vision_id=True)
    with torch.inference_mode():
        out = vlm.model.generate(
            **inputs, **generate_kwargs(vlm, settings, None), output_hidden_states=True, return_dict_in_generate=True
        )
    states = [out.hidden_states[0][-1][:, -1:]] + [step[-1] for step in out.hidden_states[1:]]
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.cat(states, dim=1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    num_tokens = args.num_tokens or (16 if args.tiny else 128)
    cold_compile_caches(args)
    with tempfile.TemporaryDirectory() as workdir:
        vlm = build_vlm(args.tiny, device, Path(workdir), args.layers)
    vlm.fast_options = fast_options(args)
    size = 56 if args.tiny else args.image_size
    images = [standin.draw_shape_image("red", size=size), standin.draw_shape_image("blue", size=size)]
    messages = chat_messages(cobsat_content(["red", "blue", "green"], images))
    # Same pictures, more words: another prompt length, which must reuse what the first call compiled and captured.
    longer = chat_messages(cobsat_content(["crimson red", "deep ocean blue", "bright green"], images))
    settings = GenerationSettings(num_tokens=num_tokens, greedy=True)

    ours_call = lambda: encode_with_vlm(vlm, messages, settings, add_vision_id=True, engine="fast")  # noqa: E731
    hook_call = lambda: encode_with_vlm(vlm, messages, settings, add_vision_id=True, engine="generate")  # noqa: E731
    reference_call = lambda: reference_encode(vlm, messages, settings)  # noqa: E731
    reference_call()  # warm-up of the device, kernels and allocator, so the first fast call shows its own cost
    counters.clear()
    first_call_s, _ = timed(ours_call, device, 1)  # compile + graph capture + one encode
    graphs_after_first = counters["stats"]["unique_graphs"]
    hook_call()
    ours_time, ours = timed(ours_call, device, args.repeats)
    reference_time, (reference_ids, reference_states) = timed(reference_call, device, args.repeats)
    hook_time, _ = timed(hook_call, device, args.repeats)
    longer_time, longer_features = timed(
        lambda: encode_with_vlm(vlm, longer, settings, add_vision_id=True, engine="fast"), device, 1
    )
    # Free-running greedy runs split at the first near-tie that bf16 sums break differently; after that their states
    # belong to other tokens. So the agreement is judged with our engine fed the reference's tokens (teacher forcing):
    # its own greedy pick at every step, and the states of the very same tokens.
    forced, _, teacher_states = teacher_forced(vlm, [messages], settings, reference_ids, add_vision_id=True)
    difference = (teacher_states.float() - reference_states.float()).abs()
    mismatch = (ours.generated_ids.cpu() != reference_ids.cpu()).any(dim=0).nonzero()
    peak = {"reference": peak_memory(device, reference_call), "ours": peak_memory(device, ours_call)}
    decoder = vlm.fast_decoder()
    result = {
        "bench": "vlm_encode",
        **environment(device),
        "shapes": {
            "model": "tiny stand-in"
            if args.tiny
            else f"Qwen2-VL-7B (random bf16 weights{f', {args.layers} layers' if args.layers else ''})",
            "prompt_tokens": int(ours.prompt_ids.shape[1]),
            "longer_prompt_tokens": int(longer_features.prompt_ids.shape[1]),
            "images": 2,
            "generated_tokens": num_tokens,
        },
        "engine": {
            "compiled": decoder.compiled,
            "cuda_graphs": decoder.captured_graphs > 0,
            "captured_graphs": decoder.captured_graphs,
        },
        "reference": "generate(output_hidden_states=True), last layer picked",
        "reference_s": round(reference_time, 4),
        "generate_with_hook_s": round(hook_time, 4),
        "ours_s": round(ours_time, 4),
        "first_call_s": round(first_call_s, 3),
        "new_prompt_length_s": round(longer_time, 4),
        "recompiled_for_new_length": counters["stats"]["unique_graphs"] != graphs_after_first,
        "reference_tokens_per_s": round(num_tokens / reference_time, 1),
        "ours_tokens_per_s": round(num_tokens / ours_time, 1),
        "speedup": round(reference_time / ours_time, 3),
        "peak_memory_gib": peak,
        "tokens_identical": bool(torch.equal(ours.generated_ids.cpu(), reference_ids.cpu())),
        "first_divergence": int(mismatch[0]) if len(mismatch) else None,
        "teacher_forced": {
            "greedy_disagreements": forced.disagreements(),
            "max_relative_margin": forced.max_margin(),  # below ~2**-7: near-ties within bf16 rounding
        },
        "greedy_agrees_up_to_near_ties": forced.disagreements() == 0 or forced.max_margin() <= 2**-7,
        "max_abs_feature_difference": difference.max().item(),
        # bf16 tolerance as torch.testing's rtol for bfloat16 (1.6e-2), against the reference's own scale
        "features_within_bf16_tolerance": bool((difference <= 1.6e-2 * (1 + reference_states.float().abs())).all()),
    }
    result["allocated_after_release_gib"] = allocated_after_release(vlm, device)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
