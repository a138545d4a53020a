"""Image conversions at the VLM's edge: ComfyUI IMAGE tensors <-> PIL, and the pixel budget before the processor."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .errors import PromptError

# Images larger than this are scaled down (aspect kept) before the processor sees them: Qwen2-VL's own limit is
# 12.8 MP, whose vision tokens would not fit most GPUs. 1280 * 28 * 28 pixels is about 1280 vision tokens.
DEFAULT_MAX_IMAGE_PIXELS = 1280 * 28 * 28
MAX_ASPECT_RATIO = 200  # Qwen2-VL's image processor refuses a longer side over 200 times the shorter


def fit_pixel_budget(image: Image.Image, max_pixels: int) -> Image.Image:
    """RGB copy of `image`, scaled down (aspect kept) so that width * height <= max_pixels.

    16-bit and 32-bit greyscale images (PNG modes I;16 and I) are scaled to 8 bits first: PIL's own conversion clips them.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray((array / peak * 255).clip(0, 255).astype(np.uint8), mode="L")
    image = image.convert("RGB")
    long, short = max(image.size), min(image.size)
    if long > MAX_ASPECT_RATIO * short:
        raise PromptError(
            f"an image of {image.width}x{image.height} pixels is {long / short:.0f}:1; Qwen2-VL takes at most "
            f"{MAX_ASPECT_RATIO}:1. Crop or pad it to a less extreme shape."
        )
    pixels = image.width * image.height
    if pixels <= max_pixels:
        return image
    scale = (max_pixels / pixels) ** 0.5
    size = (max(28, int(image.width * scale)), max(28, int(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def pil_images_from_tensor(images: torch.Tensor) -> list[Image.Image]:
    """(batch, height, width, channels) floats in [0, 1] (ComfyUI's IMAGE) -> RGB PIL images.

    Greyscale (1 channel) and RGBA (4 channels, alpha dropped onto white) are accepted.
    """
    if not isinstance(images, torch.Tensor):
        raise PromptError(
            f"an image input got a {type(images).__name__}, not an IMAGE tensor: connect Load Image (or another node's "
            f"IMAGE output)."
        )
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[-1] not in (1, 3, 4):
        raise PromptError(f"expected images shaped (batch, height, width, 1|3|4 channels), got {tuple(images.shape)}")
    if images.numel() == 0:
        raise PromptError(f"the image is empty (shape {tuple(images.shape)}); connect a picture with pixels.")
    bad = int((~torch.isfinite(images)).sum()) if images.is_floating_point() else 0
    if bad:  # clamp() would turn NaN into black: a broken upstream node must not become a plausible picture
        raise PromptError(
            f"the image holds {bad} NaN/inf value(s) of {images.numel()}; the node that made it failed (a VAE decode "
            f"in float16 often does). Fix or replace that node's output."
        )
    if images.dtype == torch.bool:
        images = images.float()
    elif not images.is_floating_point():  # 0..255 integers (a PIL-style array), not ComfyUI's 0..1 floats
        if images.dtype != torch.uint8 and (int(images.min()) < 0 or int(images.max()) > 255):
            raise PromptError(
                f"the image is of dtype {images.dtype} with values {int(images.min())}..{int(images.max())}; an IMAGE "
                f"holds floats in 0..1 (or 0..255 integers). Convert it with the node that made it."
            )
        images = images.float() / 255
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    out = []
    for array in pixels:
        if array.shape[-1] == 1:
            out.append(Image.fromarray(array[..., 0], mode="L").convert("RGB"))
        elif array.shape[-1] == 4:
            rgba = Image.fromarray(array, mode="RGBA")
            background = Image.new("RGB", rgba.size, "white")
            background.paste(rgba, mask=rgba.getchannel("A"))
            out.append(background)
        else:
            out.append(Image.fromarray(array, mode="RGB"))
    return out


def image_tensor_from_pil(image: Image.Image) -> torch.Tensor:
    """PIL -> ComfyUI IMAGE (1, height, width, 3) floats in [0, 1], as LoadImage outputs: the inverse of the above."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]
