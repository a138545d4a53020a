"""Build stand-in FLUX.1-dev, FLUX VAE and CLIP-L files with ComfyUI's own model classes, random weights.

    PYTHONPATH=COMFYUI_PATH python tests/integration/comfy_standins.py COMFYUI_PATH OUT_DIR

Run with ComfyUI's python (conftest.py does, in a subprocess, and caches OUT_DIR per ComfyUI version). ComfyUI
detects models by key names, but reads only some sizes from the weights (comfy/model_detection.py, comfy/sd.py):
- FLUX: the config is the one this ComfyUI's own detection (comfy.model_detection.detect_unet_config) gives a FLUX.1-dev
  file with 1 double + 1 single block (546 M parameters, 1.1 GB in bf16), guidance embedder present (= dev): full
  width (hidden 3072, 24 heads, context 4096), and whatever else the version's FluxParams needs (0.33 added
  txt_ids_dims). The built model's own state dict must detect to the same config, so UNETLoader loads it as built.
- VAE: the default AutoencoderKL branch fixes ch 128, ch_mult [1, 2, 4, 4]; z_channels (16 for FLUX) comes from the
  weights. Full size (84 M parameters).
- CLIP-L: built from a fixed config (123 M parameters).
- SD3.5: a CheckpointLoaderSimple file: ComfyUI's own MMDiT (OpenAISignatureMMDITWrapper) under
  model.diffusion_model., config from this ComfyUI's detection of an SD3.5 Large sketch (16 latent channels, patch 2,
  qk RMS norm, pooled 2048 wide, context 4096 wide, pos_embed 192x192) at depth 2 (detection reads hidden = 64 x depth:
  128 wide, 2 joint blocks, the last context pre-only; 6 M parameters), plus the VAE above (SD3 and FLUX share the
  16-channel AutoencoderKL) under first_stage_model.; no text encoders (ComfyUI warns and loads none).
- Chroma: ComfyUI's own Chroma class, config from this ComfyUI's detection (fixed: hidden 3072, context 4096, the
  5-layer 5120-wide distilled guidance approximator) with 1 double + 1 single block (~0.7 B parameters, bf16).
ComfyUI's layers skip weight initialisation (weights are loaded later), so every parameter is set here explicitly:
normal(0, 0.02) for matrices, 1 for norm scales, 0 for biases. The outputs are noise; only the plumbing is real.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

FILES = {
    "flux": "flux1-dev-STANDIN.safetensors",
    "vae": "ae-STANDIN.safetensors",
    "clip_l": "clip_l-STANDIN.safetensors",
    "sd35": "sd3.5-STANDIN.safetensors",
    "chroma": "chroma-STANDIN.safetensors",
}


def init_weights(module) -> None:
    import torch

    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim >= 2:
                parameter.normal_(0.0, 0.02)
            elif name.endswith("scale") or (("norm" in name or ".ln_" in name) and name.endswith("weight")):
                parameter.fill_(1.0)
            else:
                parameter.zero_()


# The tensors by which ComfyUI tells a FLUX.1-dev file (its key names and the shapes it reads), with 1 double and
# 1 single block: detection turns them into the Flux config of the ComfyUI at hand.
FLUX_DEV_SKETCH = {
    "img_in.weight": (3072, 64),
    "txt_in.weight": (3072, 4096),
    "vector_in.in_layer.weight": (3072, 768),
    "guidance_in.in_layer.weight": (3072, 256),
    "time_in.in_layer.weight": (3072, 256),
    "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
    "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
    "single_blocks.0.norm.key_norm.scale": (128,),
    "single_blocks.0.linear1.weight": (21504, 3072),
    "final_layer.linear.weight": (64, 3072),
}


def detected_config(state_dict, is_it, what: str) -> dict:
    """The unet config this ComfyUI's model detection reads from `state_dict` (what UNETLoader builds); exits with
    `what` ("the X stand-in as Y") unless is_it(config)."""
    import comfy.model_detection

    config = comfy.model_detection.detect_unet_config(state_dict, "")
    if config is None or not is_it(config):
        raise SystemExit(f"this ComfyUI does not detect {what}: {config}")
    return config


def build_detected(model_class, sketch: dict, config_of, name: str, dtype):
    """model_class built with the config detection gives `sketch` (key: shape), checked to detect to it again."""
    import comfy.ops
    import torch

    config = config_of({key: torch.empty(shape, device="meta") for key, shape in sketch.items()})
    model = model_class(**config, dtype=dtype, operations=comfy.ops.manual_cast)
    detected = config_of(model.state_dict())
    if detected != config:
        raise SystemExit(f"the {name} stand-in would load with another config: built {config}, detected {detected}")
    print(f"{name} stand-in config (this ComfyUI's detection): {config}", flush=True)
    return model


def flux_config(state_dict) -> dict:
    """The unet config this ComfyUI's model detection reads from a FLUX state dict (what UNETLoader builds)."""
    return detected_config(
        state_dict, lambda config: config.get("image_model") == "flux", "the FLUX.1-dev stand-in as FLUX"
    )


def build_flux(dtype):
    from comfy.ldm.flux.model import Flux

    return build_detected(Flux, FLUX_DEV_SKETCH, flux_config, "FLUX", dtype)


# An SD3.5 Large checkpoint's MMDiT tensors as detection reads them, at depth 2 (hidden 128) instead of 38.
SD35_DEPTH = 2
SD35_HIDDEN = 64 * SD35_DEPTH
SD35_SKETCH = {
    "x_embedder.proj.weight": (SD35_HIDDEN, 16, 2, 2),
    "y_embedder.mlp.0.weight": (SD35_HIDDEN, 2048),
    "context_embedder.weight": (SD35_HIDDEN, 4096),
    "pos_embed": (1, 192 * 192, SD35_HIDDEN),
    "joint_blocks.0.context_block.attn.qkv.weight": (3 * SD35_HIDDEN, SD35_HIDDEN),
    "joint_blocks.0.context_block.attn.ln_q.weight": (64,),
    "joint_blocks.1.context_block.attn.qkv.weight": (3 * SD35_HIDDEN, SD35_HIDDEN),
    "final_layer.linear.weight": (2 * 2 * 16, SD35_HIDDEN),
}


def mmdit_config(state_dict) -> dict:
    return detected_config(
        state_dict,
        lambda config: config.get("context_embedder_config") is not None and config.get("qk_norm") == "rms",
        "the SD3.5 stand-in as an SD3.5 MMDiT",
    )


def build_sd35(dtype):
    """{model.diffusion_model.*: MMDiT, first_stage_model.*: VAE}, the layout CheckpointLoaderSimple reads."""
    import torch
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

    model = build_detected(OpenAISignatureMMDITWrapper, SD35_SKETCH, mmdit_config, "SD3.5", dtype)
    return torch.nn.ModuleDict({"model": torch.nn.ModuleDict({"diffusion_model": model})})


CHROMA_SKETCH = {
    "img_in.weight": (3072, 64),
    "txt_in.weight": (3072, 4096),
    "distilled_guidance_layer.norms.0.scale": (5120,),
    "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
    "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
    "single_blocks.0.norm.key_norm.scale": (128,),
    "single_blocks.0.linear1.weight": (21504, 3072),
    "final_layer.linear.weight": (64, 3072),
}


def chroma_config(state_dict) -> dict:
    return detected_config(
        state_dict, lambda config: config.get("image_model") == "chroma", "the Chroma stand-in as Chroma"
    )


def build_chroma(dtype):
    from comfy.ldm.chroma.model import Chroma

    return build_detected(Chroma, CHROMA_SKETCH, chroma_config, "Chroma", dtype)


def build_vae():
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ddconfig = {
        "double_z": True,
        "z_channels": 16,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    return AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig},
    )


def build_clip_l(dtype):
    import comfy.sd1_clip

    return comfy.sd1_clip.SDClipModel(device="cpu", dtype=dtype).transformer  # keys text_model.*, text_projection.*


def main(argv: list[str]) -> int:
    comfyui_path, out_dir = Path(argv[0]).resolve(), Path(argv[1])
    try:
        from comfy.cli_args import args
    except ModuleNotFoundError as error:
        raise SystemExit(f"ComfyUI's `comfy` package is not importable: run with PYTHONPATH={comfyui_path}") from error

    args.cpu = True  # before comfy.model_management is imported: CPU-only torch would fail otherwise
    import torch
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    builders = {
        "flux": lambda: build_flux(torch.bfloat16),
        "vae": build_vae,
        "clip_l": lambda: build_clip_l(torch.float16),
        "sd35": lambda: build_sd35(torch.bfloat16),
        "chroma": lambda: build_chroma(torch.bfloat16),
    }
    save_dtypes = {
        "flux": torch.bfloat16,
        "vae": torch.bfloat16,
        "clip_l": torch.float16,
        "sd35": torch.bfloat16,
        "chroma": torch.bfloat16,
    }
    for kind, file_name in FILES.items():
        path = out_dir / file_name
        if path.exists():
            continue
        started = time.perf_counter()
        torch.manual_seed(0)
        model = builders[kind]()
        init_weights(model)
        state = {key: value.to(save_dtypes[kind]).contiguous() for key, value in model.state_dict().items()}
        if kind == "sd35":  # the checkpoint also carries the VAE, as SD3.5 files do
            vae = build_vae()
            init_weights(vae)
            state.update(
                {f"first_stage_model.{k}": v.to(torch.bfloat16).contiguous() for k, v in vae.state_dict().items()}
            )
            del vae
        tmp = path.with_suffix(".tmp")
        save_file(state, str(tmp), metadata={"thinkdiff_standin": "random weights for tests"})
        tmp.replace(path)
        count = sum(value.numel() for value in state.values())
        print(f"{file_name}: {count / 1e6:.0f} M parameters in {time.perf_counter() - started:.1f} s", flush=True)
        del model, state
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
