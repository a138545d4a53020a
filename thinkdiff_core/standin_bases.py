"""Tiny diffusers pipelines of the other T5-XXL bases (SD3/SD3.5, Chroma, PixArt-Sigma), random weights, built
locally from small configs, for the tests and offline runs of `--base` (thinkdiff_core.standin has the FLUX one).

Each keeps the real conditioning widths, so that real aligner outputs and ComfyUI-shaped conditionings fit: T5 tokens
4096 wide; for SD3 also CLIP-L (hidden 768, projection 768) and CLIP-G (hidden 1280, projection 1280), whence a
2048-wide CLIP block zero-padded to 4096 and a 2048-wide pooled vector. Everything else is toy-sized: one layer each,
a two-block VAE, 32-pixel images in a fraction of a second on a CPU. They draw noise, never what the real models do.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .standin import (
    T5_WIDTH,
    TINY_FLUX_TRANSFORMER,
    bpe_clip_tokenizer,
    bpe_t5_tokenizer,
    tiny_t5_encoder,
    tiny_vae,
)

STANDIN_BASES = ("sd3", "chroma", "pixart")  # what build_base_pipeline makes (FLUX: standin.build_flux_pipeline)


def _clip_with_projection(vocab_size: int, hidden_size: int):
    """A one-layer CLIP text tower with a projection as wide as its hidden states (CLIP-L: 768, CLIP-G: 1280)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,  # SD3 reads the penultimate layer
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden_size,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config).eval()


def build_sd3_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline (SD3/SD3.5 layout: CLIP-L, CLIP-G, T5-XXL widths; MMDiT with one block)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=16,
        pooled_projection_dim=768 + 1280,
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    clip_l_tokenizer, clip_g_tokenizer, t5_tokenizer = bpe_clip_tokenizer(), bpe_clip_tokenizer(), bpe_t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3's
        vae=tiny_vae(scaling_factor=1.5305, shift_factor=0.0609),  # SD3's VAE values
        text_encoder=_clip_with_projection(len(clip_l_tokenizer), 768),
        tokenizer=clip_l_tokenizer,
        text_encoder_2=_clip_with_projection(len(clip_g_tokenizer), 1280),
        tokenizer_2=clip_g_tokenizer,
        text_encoder_3=tiny_t5_encoder(len(t5_tokenizer)),
        tokenizer_3=t5_tokenizer,
    )


def build_chroma_pipeline(seed: int = 0):
    """A ChromaPipeline (T5-XXL only, no pooled vector; FLUX-like transformer with one block of each kind)."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        **TINY_FLUX_TRANSFORMER,
        axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    ).eval()
    tokenizer = bpe_t5_tokenizer()
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(scaling_factor=0.3611, shift_factor=0.1159),  # FLUX.1's VAE, which Chroma uses
        text_encoder=tiny_t5_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        transformer=transformer,
    )


def build_pixart_pipeline(seed: int = 0):
    """A PixArtSigmaPipeline (T5-XXL only, with a T5 attention mask; DiT with one block)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        cross_attention_dim=16,
        sample_size=16,
        patch_size=2,
        caption_channels=T5_WIDTH,
        use_additional_conditions=False,
    ).eval()
    tokenizer = bpe_t5_tokenizer()
    return PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_t5_encoder(len(tokenizer)),
        vae=tiny_vae(scaling_factor=0.13025),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def build_base_pipeline(kind: str, seed: int = 0):
    """The stand-in pipeline of `kind` ('sd3', 'chroma', 'pixart'; 'flux' is standin.build_flux_pipeline)."""
    if kind == "flux":
        from .standin import build_flux_pipeline

        return build_flux_pipeline(seed=seed)
    builders = {"sd3": build_sd3_pipeline, "chroma": build_chroma_pipeline, "pixart": build_pixart_pipeline}
    if kind not in builders:
        raise ValueError(f"stand-in base must be one of flux, {', '.join(builders)}; got {kind!r}")
    return builders[kind](seed=seed)


def save_base_pipeline(kind: str, path: str | Path, seed: int = 0) -> Path:
    """Save `build_base_pipeline(kind)` as a diffusers pipeline folder (model_index.json + components) at `path`."""
    path = Path(path)
    build_base_pipeline(kind, seed=seed).save_pretrained(path)
    return path
