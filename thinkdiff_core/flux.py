"""FLUX.1 through diffusers, for scripts and the offline demo (inside ComfyUI, its own sampler nodes do this).

The recipe's pipeline (section 10) passes the aligned tokens as `prompt_embeds` and CLIP-L's pooled vector of the
empty string as `pooled_prompt_embeds`; guidance 3.5, 28 steps, no negative prompt.
"""

from __future__ import annotations

import torch
from PIL import Image

from .conditioning import DEFAULT_GUIDANCE, to_diffusers_embeds


def empty_prompt_conditioning(pipe, guidance: float = DEFAULT_GUIDANCE, max_sequence_length: int = 128) -> list[list]:
    """CONDITIONING of the empty prompt through the pipeline's CLIP-L and T5: the base the paper's LVLM mode uses."""
    with torch.inference_mode():
        prompt_embeds, pooled, _ = pipe.encode_prompt(prompt="", prompt_2="", max_sequence_length=max_sequence_length)
    return [[prompt_embeds.float().cpu(), {"pooled_output": pooled.float().cpu(), "guidance": guidance}]]


def text_conditioning(
    pipe, text: str, guidance: float = DEFAULT_GUIDANCE, max_sequence_length: int = 512
) -> list[list]:
    """CONDITIONING of `text` through FLUX's own encoders: T5 tokens (1, max_sequence_length, 4096) and CLIP-L pooled.

    The same text goes to both encoders, as CLIPTextEncodeFlux with one prompt (or diffusers with prompt only).
    """
    with torch.inference_mode():
        prompt_embeds, pooled, _ = pipe.encode_prompt(
            prompt=text, prompt_2=text, max_sequence_length=max_sequence_length
        )
    return [[prompt_embeds.float().cpu(), {"pooled_output": pooled.float().cpu(), "guidance": guidance}]]


def render(
    pipe,
    conditioning: list,
    steps: int = 28,
    seed: int = 42,
    width: int = 1024,
    height: int = 1024,
) -> Image.Image:
    """One image from a FLUX CONDITIONING (its first entry), like KSampler with cfg 1 on FLUX-dev."""
    prompt_embeds, pooled = to_diffusers_embeds(conditioning)
    guidance = conditioning[0][1].get("guidance", DEFAULT_GUIDANCE)
    dtype = pipe.transformer.dtype
    device = pipe.transformer.device
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.inference_mode():
        result = pipe(
            prompt_embeds=prompt_embeds.to(device, dtype),
            pooled_prompt_embeds=pooled.to(device, dtype),
            num_inference_steps=steps,
            guidance_scale=DEFAULT_GUIDANCE if guidance is None else guidance,
            width=width,
            height=height,
            generator=generator,
        )
    return result.images[0]
