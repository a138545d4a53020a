"""The ThinkDiff-CLIP image side: BLIP-2's vision tower -> 65 tokens per image (recipe section 7).

The official CLIP variant feeds the aligner the **post-layernorm last hidden state** of BLIP-2's EVA ViT-g
(`Salesforce/blip2-flan-t5-xxl`, width 1408): 1 CLS token + 16x16 patch tokens for a 224x224 image. With
`vision_downsample_factor: 2` the patch grid is resized bilinearly (align_corners=False) to 8x8 and put back after
the CLS token, giving 1 + 64 = 65 tokens per image. No Q-Former and no BLIP-2 language projection are used.

Preprocessing as in the official training: resize to 224x224 bicubic (no crop, no augmentation), scale to [0, 1],
normalise with the OpenAI-CLIP mean and std. BLIP-2's own image processor does the same for inference.

transformers is imported lazily; nothing here imports ComfyUI.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ModelFolderError, PromptError, first_line
from .files import write_atomic
from .hf_compat import dtype_kwargs, import_transformers
from .images import pil_images_from_tensor

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224
DOWNSAMPLE_FACTOR = 2  # 16x16 patches -> 8x8, recipe section 7
VISION_PREFIX = "vision_model."  # key prefix of the vision tower inside a full BLIP-2 checkpoint
VISION_CONFIG_KEY = "thinkdiff.vision_config"  # header key of an extracted vision-tower file


def preprocess_images(images: Sequence[Image.Image] | torch.Tensor, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """PIL images, or a ComfyUI IMAGE tensor (batch, height, width, channels) in [0, 1] -> pixel_values
    (batch, 3, image_size, image_size), float32, CLIP-normalised.

    Resize is PIL bicubic straight to image_size x image_size (aspect not kept, no crop), as the official
    `transforms.Resize((224, 224), BICUBIC)` on PIL images does.
    """
    if isinstance(images, torch.Tensor):
        images = pil_images_from_tensor(images)
    if isinstance(images, Image.Image):
        images = [images]
    if len(images) == 0:
        raise PromptError("no images to encode: connect at least one image.")
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    pixel_values = []
    for image in images:
        resized = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
        array = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
        pixel_values.append((array - mean) / std)
    return torch.stack(pixel_values)


def pool_vision_tokens(hidden_states: torch.Tensor, downsample_factor: int = DOWNSAMPLE_FACTOR) -> torch.Tensor:
    """(batch, 1 + grid*grid, width) -> (batch, 1 + (grid/f)^2, width): CLS kept, patch grid resized bilinearly.

    For BLIP-2 at 224 px: (batch, 257, 1408) -> (batch, 65, 1408). The resize runs in float32 and the result is
    cast back to the input dtype.
    """
    if hidden_states.dim() != 3:
        raise ValueError(f"expected (batch, tokens, width), got shape {tuple(hidden_states.shape)}")
    if downsample_factor == 1:
        return hidden_states
    batch, tokens, width = hidden_states.shape
    grid = round((tokens - 1) ** 0.5)
    if grid * grid != tokens - 1 or grid % downsample_factor:
        raise ValueError(
            f"{tokens} tokens are not 1 CLS + a square patch grid divisible by {downsample_factor} "
            f"(BLIP-2 at 224 px gives 257 = 1 + 16x16)"
        )
    cls_token, patches = hidden_states[:, :1], hidden_states[:, 1:]
    patches = patches.float().transpose(1, 2).reshape(batch, width, grid, grid)  # (B, D, g, g)
    size = grid // downsample_factor
    patches = F.interpolate(patches, size=(size, size), mode="bilinear", align_corners=False)
    patches = patches.reshape(batch, width, size * size).transpose(1, 2).to(hidden_states.dtype)
    return torch.cat([cls_token, patches], dim=1)


@torch.no_grad()
def encode_images(
    vision_model: torch.nn.Module,
    images: Sequence[Image.Image] | torch.Tensor,
    downsample_factor: int = DOWNSAMPLE_FACTOR,
    as_one_sequence: bool = False,
) -> torch.Tensor:
    """Images -> pooled vision tokens, (num_images, 65, width) for BLIP-2.

    `images` may also be pixel_values already (a float tensor shaped (batch, 3, H, W)). With as_one_sequence the
    images are joined in input order into one prompt, (1, 65 * num_images, width): the official multi-image layout.
    """
    if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[1] == 3 and images.shape[-1] != 3:
        pixel_values = images
    else:
        pixel_values = preprocess_images(images, image_size=_image_size(vision_model))
    parameter = next(vision_model.parameters())
    outputs = vision_model(pixel_values=pixel_values.to(parameter.device, parameter.dtype))
    tokens = pool_vision_tokens(outputs.last_hidden_state, downsample_factor)  # post-layernorm in Blip2VisionModel
    return tokens.reshape(1, -1, tokens.shape[-1]) if as_one_sequence else tokens


def load_vision_encoder(
    path: str | Path, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"
) -> torch.nn.Module:
    """Load BLIP-2's vision tower, frozen and in eval mode. Never downloads.

    `path` is a full BLIP-2 folder (e.g. Salesforce/blip2-flan-t5-xxl: only the `vision_model.*` weights are read,
    the 11B language model is not loaded), a folder saved from a `Blip2VisionModel` alone, or a single safetensors
    file written by `extract_vision_tower` (config in its header).
    """
    path = Path(path)
    if path.is_file():
        return _load_vision_file(path, dtype).to(device=device).eval().requires_grad_(False)
    if not (path / "config.json").is_file():
        raise ModelFolderError(
            f"vision encoder folder '{path}' has no config.json. Point it at a local copy of "
            f"Salesforce/blip2-flan-t5-xxl (or a folder saved from Blip2VisionModel)."
        )
    from safetensors import SafetensorError

    from .vlm_loader import CONFIG_VALIDATION_ERRORS, check_loading_info, describe_keys, read_config_json

    transformers = import_transformers()
    config = read_config_json(path)
    model_type = config.get("model_type")
    try:
        if model_type == "blip_2_vision_model":
            model, info = transformers.Blip2VisionModel.from_pretrained(
                path, local_files_only=True, output_loading_info=True, **dtype_kwargs(dtype)
            )
            check_loading_info(info, path, "BLIP-2's vision tower")
        elif model_type == "blip-2":
            vision_config = transformers.Blip2VisionConfig(**config.get("vision_config", {}))
            state = _read_prefixed_weights(path, VISION_PREFIX)
            with torch.device("meta"):  # no random init of ~1 B parameters that are overwritten right away
                model = transformers.Blip2VisionModel(vision_config)
            missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
            if missing:
                raise ModelFolderError(
                    f"'{path}' lacks {len(missing)} tensor(s) of BLIP-2's vision tower ({describe_keys(missing)}): the "
                    f"download is incomplete. Fetch every *.safetensors file of the BLIP-2 repository."
                )
            check_loading_info({"unexpected_keys": unexpected}, path, "BLIP-2's vision tower")  # layers cut off
    except (
        RuntimeError,
        ValueError,
        OSError,
        SafetensorError,
        TypeError,
        KeyError,
        *CONFIG_VALIDATION_ERRORS,
    ) as error:
        if isinstance(error, torch.OutOfMemoryError):
            raise
        raise ModelFolderError(
            f"the vision tower weights in '{path}' could not be loaded ({first_line(error)}): a weight "
            f"file is truncated, corrupt or of another model (shapes that do not fit config.json). Download the "
            f"BLIP-2 repository again."
        ) from error
    if model_type not in ("blip_2_vision_model", "blip-2"):
        raise ModelFolderError(
            f"'{path.name}' is a '{model_type}' model, not BLIP-2. ThinkDiff-CLIP uses the vision tower of "
            f"Salesforce/blip2-flan-t5-xxl (model_type 'blip-2')."
        )
    model.thinkdiff_source = path.name
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def extract_vision_tower(source: str | Path, destination: str | Path) -> Path:
    """Write just the vision tower of a BLIP-2 folder as one safetensors file, its config in the header.

    The full Salesforce/blip2-flan-t5-xxl checkpoint is about 12 B parameters, nearly all of them the flan-T5 that
    ThinkDiff-CLIP never uses; the tower alone is about 1 B (2 GB in bf16). Weights keep their stored dtype.
    """
    from safetensors.torch import save_file

    from .files import same_file

    if same_file(source, destination) or Path(source).resolve() in Path(destination).resolve().parents:
        raise ModelFolderError(
            f"extract-vision: the output '{destination}' is the input folder or inside it, where it could replace "
            f"the source's weights. Write it elsewhere, e.g. models/clip_vision/blip2_vision_tower.safetensors."
        )
    if Path(destination).suffix.lower() != ".safetensors":
        raise ModelFolderError(
            f"extract-vision: the output '{Path(destination).name}' must end in .safetensors (the format written)."
        )
    if Path(destination).is_dir():
        raise ModelFolderError(f"extract-vision: the output '{destination}' is a folder; give a file name inside it.")
    if not (Path(source) / "config.json").is_file():
        raise ModelFolderError(
            f"'{source}' has no config.json: point extract-vision at a local BLIP-2 folder (a download of "
            f"Salesforce/blip2-flan-t5-xxl with its *.safetensors files)."
        )
    stored = {"F32": torch.float32, "F16": torch.float16}.get(_stored_dtype(Path(source)), torch.bfloat16)
    model = load_vision_encoder(source, dtype=stored)
    metadata = {
        VISION_CONFIG_KEY: json.dumps(model.config.to_dict()),
        "thinkdiff.source_model": Path(source).name,
        "thinkdiff.format_version": "1",
    }
    tensors = {key: value.contiguous() for key, value in model.state_dict().items()}
    return write_atomic(destination, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def is_vision_tower_file(path: str | Path) -> bool:
    """Whether `path` is a safetensors file written by `extract_vision_tower` (reads only the header)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return VISION_CONFIG_KEY in (handle.metadata() or {})
    except Exception:  # any unreadable file is simply not one of ours; the loader reports real errors
        return False


def _load_vision_file(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    from safetensors import SafetensorError, safe_open

    transformers = import_transformers()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFolderError(
            f"'{path.name}' is not a readable safetensors file ({error}): extract or download it again."
        ) from error
    from .vlm_loader import describe_keys

    if VISION_CONFIG_KEY not in metadata:
        raise ModelFolderError(
            f"'{path.name}' has no vision-tower config in its header: it was not made by "
            f"'python -m thinkdiff_core extract-vision'. Choose a BLIP-2 folder or an extracted file."
        )
    try:
        config = transformers.Blip2VisionConfig(**json.loads(metadata[VISION_CONFIG_KEY]))
        with torch.device("meta"):  # no random init: every weight comes from the file
            model = transformers.Blip2VisionModel(config)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except (json.JSONDecodeError, TypeError, ValueError, RuntimeError) as error:  # RuntimeError: a size mismatch
        raise ModelFolderError(
            f"'{path.name}' does not hold the vision tower its header describes ({first_line(error)}). "
            f"Extract it again with 'python -m thinkdiff_core extract-vision'."
        ) from error
    if missing or unexpected:
        raise ModelFolderError(
            f"'{path.name}' does not hold the vision tower its header describes: "
            f"{f'missing {describe_keys(missing)}' if missing else ''}"
            f"{'; ' if missing and unexpected else ''}{f'unexpected {describe_keys(unexpected)}' if unexpected else ''}. "
            f"Extract it again with 'python -m thinkdiff_core extract-vision'."
        )
    model.thinkdiff_source = metadata.get("thinkdiff.source_model", path.stem)
    return model.to(dtype)


def _stored_dtype(path: Path) -> str:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        return "BF16"  # the loader names the missing weights
    with safe_open(str(files[0]), framework="pt", device="cpu") as handle:
        key = next(iter(handle.keys()))
        return str(handle.get_slice(key).get_dtype())


# --- features for the conditioning node ----------------------------------------------------------------------------

# Patch tokens kept per image -> downsample factor of the 16x16 grid. The aligner was trained on 8x8 (recipe
# section 7); fewer tokens let the text weigh more (what users ask of Redux-like nodes).
TOKEN_GRIDS = {
    "8x8 (65 tokens, recipe)": 2,
    "16x16 (257 tokens)": 1,
    "4x4 (17 tokens)": 4,
    "2x2 (5 tokens)": 8,
}


@dataclass(frozen=True)
class VisionFeatures:
    """ThinkDiff-CLIP image tokens of one prompt: (1, tokens_per_image * num_images, width), images in input order."""

    hidden_states: torch.Tensor
    num_images: int
    source_model: str = ""
    variant = "clip"  # class constant, not a field: which aligner variant these features feed


def encode_vision_features(
    vision_model: torch.nn.Module,
    images: Sequence[torch.Tensor | Image.Image],
    token_grid: str = next(iter(TOKEN_GRIDS)),
) -> VisionFeatures:
    """Every image (PIL, or ComfyUI IMAGE tensors whose batches count as several images) -> one CPU float32 sequence."""
    if token_grid not in TOKEN_GRIDS:
        raise PromptError(f"unknown token grid {token_grid!r}; choose one of {list(TOKEN_GRIDS)}")
    pictures = [
        pil
        for image in images
        for pil in (pil_images_from_tensor(image) if isinstance(image, torch.Tensor) else [image])
    ]
    tokens = encode_images(vision_model, pictures, downsample_factor=TOKEN_GRIDS[token_grid], as_one_sequence=True)
    return VisionFeatures(
        hidden_states=tokens.float().cpu(),
        num_images=len(pictures),
        source_model=getattr(vision_model, "thinkdiff_source", ""),
    )


def _image_size(vision_model: torch.nn.Module) -> int:
    size = getattr(getattr(vision_model, "config", None), "image_size", IMAGE_SIZE)
    return size[0] if isinstance(size, (list, tuple)) else int(size)


def _read_prefixed_weights(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose key starts with `prefix` (prefix removed), read from a folder's safetensors (sharded or not)."""
    from safetensors import safe_open

    from .vlm_loader import read_weight_index

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_weight_index(index)
        files = sorted({name for key, name in weight_map.items() if key.startswith(prefix)})
    else:
        files = [file.name for file in sorted(path.glob("*.safetensors"))]
    if not files:
        raise ModelFolderError(
            f"'{path.name}' has no safetensors weights for '{prefix}*'. Download the safetensors files of the "
            f"BLIP-2 repository (pickled *.bin weights are not read)."
        )
    state = {}
    for name in files:
        with safe_open(str(path / name), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                if key.startswith(prefix):
                    state[key.removeprefix(prefix)] = handle.get_tensor(key)
    return state
