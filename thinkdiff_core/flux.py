"""The T5-XXL image models through diffusers, for scripts, the CoBSAT harness and the offline demo (inside ComfyUI,
its own sampler nodes do this): FLUX.1 (the paper's), SD3/SD3.5, Chroma and PixArt-Sigma.

The recipe's pipeline (section 10) passes the aligned tokens as `prompt_embeds` and CLIP-L's pooled vector of the
empty string as `pooled_prompt_embeds`; guidance 3.5, 28 steps, no negative prompt. The other bases take the aligned
tokens in place of their T5 tokens the same way (thinkdiff_core.conditioning); they sample with true classifier-free
guidance against an empty prompt, as their own pipelines do by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .conditioning import DEFAULT_GUIDANCE, POOLED_WIDTHS, sd3_clip_tokens, to_diffusers_embeds, token_mask
from .errors import FeatureError


@dataclass(frozen=True)
class Base:
    """A diffusers base model: its conditioning family, pipeline class, Hub repository and sampling defaults.

    guidance: FLUX's distilled guidance (None: schnell has none), else the classifier-free guidance scale.
    text_tokens: the T5 length its own text prompts are encoded at.
    """

    name: str
    family: str
    pipeline_class: str
    repo: str
    steps: int
    guidance: float | None
    text_tokens: int = 512


BASES = {
    base.name: base
    for base in [
        Base("flux-dev", "flux", "FluxPipeline", "black-forest-labs/FLUX.1-dev", 28, DEFAULT_GUIDANCE),
        Base("flux-schnell", "flux", "FluxPipeline", "black-forest-labs/FLUX.1-schnell", 4, None, 256),
        Base("flux-krea", "flux", "FluxPipeline", "black-forest-labs/FLUX.1-Krea-dev", 28, 4.5),
        Base("sd3.5-large", "sd3", "StableDiffusion3Pipeline", "stabilityai/stable-diffusion-3.5-large", 28, 3.5, 256),
        Base(
            "sd3.5-large-turbo",
            "sd3",
            "StableDiffusion3Pipeline",
            "stabilityai/stable-diffusion-3.5-large-turbo",
            4,
            0.0,
            256,
        ),
        Base(
            "sd3.5-medium", "sd3", "StableDiffusion3Pipeline", "stabilityai/stable-diffusion-3.5-medium", 40, 4.5, 256
        ),
        Base(
            "sd3-medium",
            "sd3",
            "StableDiffusion3Pipeline",
            "stabilityai/stable-diffusion-3-medium-diffusers",
            28,
            7.0,
            256,
        ),
        Base("chroma", "chroma", "ChromaPipeline", "lodestones/Chroma1-HD", 40, 3.0),
        Base("pixart-sigma", "pixart", "PixArtSigmaPipeline", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", 20, 4.5, 300),
    ]
}
DEFAULT_BASE = "flux-dev"
FAMILY_OF_PIPELINE = {base.pipeline_class: base.family for base in BASES.values()}


def pipeline_family(pipe) -> str:
    """The conditioning family of a loaded diffusers pipeline, from its class ('FluxPipeline' -> 'flux')."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in FAMILY_OF_PIPELINE:
            return FAMILY_OF_PIPELINE[cls.__name__]
    raise ValueError(f"{type(pipe).__name__} is not one of the supported pipelines {sorted(FAMILY_OF_PIPELINE)}")


def empty_prompt_conditioning(pipe, guidance: float | None = DEFAULT_GUIDANCE, max_sequence_length: int = 128) -> list:
    """CONDITIONING of the empty prompt through the pipeline's own encoders: the base the paper's LVLM mode uses
    (FLUX: CLIP-L("") pooled; SD3: CLIP-L/G("") tokens and pooled; Chroma, PixArt: no pooled vector)."""
    return text_conditioning(pipe, "", guidance, max_sequence_length)


def text_conditioning(
    pipe, text: str, guidance: float | None = DEFAULT_GUIDANCE, max_sequence_length: int = 512
) -> list[list]:
    """CONDITIONING of `text` through the base's own encoders, shaped as ComfyUI's text encode of that family.

    FLUX: T5 tokens (1, max_sequence_length, 4096), CLIP-L pooled (1, 768), guidance (the same text to both encoders,
    as CLIPTextEncodeFlux with one prompt). SD3: 77 CLIP-L/G tokens zero-padded to 4096, then max_sequence_length
    T5 tokens; pooled (1, 2048). Chroma, PixArt: T5 tokens with their attention mask, no pooled vector.
    """
    family = pipeline_family(pipe)
    with torch.inference_mode():
        if family == "flux":
            embeds, pooled, _ = pipe.encode_prompt(prompt=text, prompt_2=text, max_sequence_length=max_sequence_length)
            options = {"pooled_output": pooled.float().cpu()}
            if guidance is not None:
                options["guidance"] = guidance
            return [[embeds.float().cpu(), options]]
        if family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=text,
                prompt_2=text,
                prompt_3=text,
                device=pipe.transformer.device,
                do_classifier_free_guidance=False,
                max_sequence_length=max_sequence_length,
            )
            return [[embeds.float().cpu(), {"pooled_output": pooled.float().cpu()}]]
        if family == "chroma":
            embeds, _, mask, *_ = pipe.encode_prompt(
                prompt=text, device=pipe.transformer.device, do_classifier_free_guidance=False,
                max_sequence_length=max_sequence_length,
            )  # fmt: skip
        else:
            embeds, mask, *_ = pipe.encode_prompt(
                prompt=text, do_classifier_free_guidance=False, device=pipe.transformer.device,
                max_sequence_length=max_sequence_length, clean_caption=False,
            )  # fmt: skip
        return [[embeds.float().cpu(), {"pooled_output": None, "attention_mask": mask.long().cpu()}]]


def render(
    pipe,
    conditioning: list,
    steps: int = 28,
    seed: int = 42,
    width: int = 1024,
    height: int = 1024,
    guidance: float | None = None,
) -> Image.Image:
    """One image from a CONDITIONING (its first entry) on the pipeline's base.

    FLUX: like KSampler with cfg 1 on FLUX-dev; the distilled guidance is the conditioning's (or `guidance`).
    SD3, Chroma, PixArt: classifier-free guidance of scale `guidance` (None: the pipeline's default) against an empty
    prompt encoded to the same shape.
    """
    family = pipeline_family(pipe)
    dtype = pipe.transformer.dtype
    device = pipe.transformer.device
    generator = torch.Generator("cpu").manual_seed(seed)
    prompt_embeds, pooled = to_diffusers_embeds(conditioning)
    common = dict(num_inference_steps=steps, width=width, height=height, generator=generator)
    with torch.inference_mode():
        if family == "flux":
            distilled = conditioning[0][1].get("guidance", guidance if guidance is not None else DEFAULT_GUIDANCE)
            result = pipe(
                prompt_embeds=prompt_embeds.to(device, dtype),
                pooled_prompt_embeds=pooled.to(device, dtype),
                guidance_scale=DEFAULT_GUIDANCE if distilled is None else distilled,
                **common,
            )
        elif family == "sd3":
            negative, negative_pooled = _sd3_negative(pipe, prompt_embeds)
            if pooled.shape[-1] != POOLED_WIDTHS["sd3"]:
                raise FeatureError(
                    f"an SD3 render got a pooled vector {pooled.shape[-1]} wide, not SD3's 2048 (CLIP-L ++ CLIP-G): the "
                    f"conditioning was built for another family. Build it for sd3 (family sd3, or an SD3 base)."
                )
            result = pipe(
                prompt_embeds=prompt_embeds.to(device, dtype),
                pooled_prompt_embeds=pooled.to(device, dtype),
                negative_prompt_embeds=negative.to(device, dtype),
                negative_pooled_prompt_embeds=negative_pooled.to(device, dtype),
                **({} if guidance is None else {"guidance_scale": guidance}),
                **common,
            )
        else:
            mask = token_mask(conditioning).to(device)
            extra = {"negative_prompt": ""}
            if family == "chroma":
                mask = mask.to(dtype)  # ChromaPipeline feeds it to attention as is
            else:
                extra["use_resolution_binning"] = False  # the size asked for, not PixArt's nearest bin
            result = pipe(
                prompt_embeds=prompt_embeds.to(device, dtype),
                prompt_attention_mask=mask,
                **({} if guidance is None else {"guidance_scale": guidance}),
                **extra,
                **common,
            )
    return result.images[0]


def _sd3_negative(pipe, prompt_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty prompt through SD3's encoders with the positive's layout (StableDiffusion3Pipeline concatenates the
    two, so they must match): its CLIP-L/G block as long as the positive's (none, 77, or zero-padded to more), then
    T5("") at the positive's T5 length."""
    clip = sd3_clip_tokens(prompt_embeds)
    t5_tokens = max(1, prompt_embeds.shape[1] - clip)
    with torch.inference_mode():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt="", prompt_2="", prompt_3="", device=pipe.transformer.device,
            do_classifier_free_guidance=False, max_sequence_length=t5_tokens,
        )  # fmt: skip
    own_clip = embeds.shape[1] - t5_tokens
    block = embeds[:, : min(clip, own_clip)]
    if clip > own_clip:
        block = torch.cat([block, block.new_zeros(block.shape[0], clip - own_clip, block.shape[2])], dim=1)
    negative = torch.cat([block, embeds[:, own_clip:]], dim=1)[:, : prompt_embeds.shape[1]]
    batch = prompt_embeds.shape[0]
    return negative.float().cpu().expand(batch, -1, -1), pooled.float().cpu().expand(batch, -1)
