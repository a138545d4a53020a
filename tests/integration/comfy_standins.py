"""Build stand-in FLUX.1-dev, FLUX VAE and CLIP-L files with ComfyUI's own model classes, random weights.

    PYTHONPATH=COMFYUI_PATH python tests/integration/comfy_standins.py COMFYUI_PATH OUT_DIR

Run with ComfyUI's python (conftest.py does, in a subprocess, and caches OUT_DIR). ComfyUI detects models by key
names, but reads only some sizes from the weights (comfy/model_detection.py, comfy/sd.py in 0.3.64):
- FLUX: hidden 3072, 24 heads and context 4096 are hard-coded; double/single blocks are counted. So the stand-in has
  full width but 1 double + 1 single block (546 M parameters, 1.1 GB in bf16). Guidance embedder present (= dev).
- VAE: the default AutoencoderKL branch fixes ch 128, ch_mult [1, 2, 4, 4]; z_channels (16 for FLUX) comes from the
  weights. Full size (84 M parameters).
- CLIP-L: built from a fixed config (123 M parameters).
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
}


def init_weights(module) -> None:
    import torch

    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim >= 2:
                parameter.normal_(0.0, 0.02)
            elif name.endswith("scale") or ("norm" in name and name.endswith("weight")):
                parameter.fill_(1.0)
            else:
                parameter.zero_()


def build_flux(dtype):
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    return Flux(
        image_model="flux",
        in_channels=16,
        out_channels=16,
        vec_in_dim=768,
        context_in_dim=4096,
        hidden_size=3072,
        mlp_ratio=4.0,
        num_heads=24,
        depth=1,
        depth_single_blocks=1,
        axes_dim=[16, 56, 56],
        theta=10000,
        patch_size=2,
        qkv_bias=True,
        guidance_embed=True,
        dtype=dtype,
        operations=comfy.ops.manual_cast,
    )


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
    }
    save_dtypes = {"flux": torch.bfloat16, "vae": torch.bfloat16, "clip_l": torch.float16}
    for kind, file_name in FILES.items():
        path = out_dir / file_name
        if path.exists():
            continue
        started = time.perf_counter()
        torch.manual_seed(0)
        model = builders[kind]()
        init_weights(model)
        state = {key: value.to(save_dtypes[kind]).contiguous() for key, value in model.state_dict().items()}
        tmp = path.with_suffix(".tmp")
        save_file(state, str(tmp), metadata={"thinkdiff_standin": "random weights for tests"})
        tmp.replace(path)
        count = sum(value.numel() for value in state.values())
        print(f"{file_name}: {count / 1e6:.0f} M parameters in {time.perf_counter() - started:.1f} s", flush=True)
        del model, state
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
