"""The only module that touches ComfyUI: model folders, devices, model management, progress, Cancel.

Inside ComfyUI it uses public functions of `folder_paths`, `comfy.model_management`, `comfy.model_patcher`,
`comfy.patcher_extension` and `comfy.utils`, and writes none of ComfyUI's module-level dicts or lists itself
(tests/integration/test_adapter_in_comfyui.py checks that inside a real ComfyUI). The one internal it still reads is
named where it is used, with the versions it was checked on: 0.3.64 (a125cd84) and 0.33.0 (783545f6).
Outside ComfyUI (tests, the offline demo, scripts) the same functions work standalone: devices from torch,
progress through tqdm, model folders under a models root (`THINKDIFF_MODELS_DIR`, default `./models`, or
`set_models_root`). Nodes call only this module and `thinkdiff_core`.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from thinkdiff_core.errors import CheckpointError, ModelFolderError, ThinkDiffError

logger = logging.getLogger(__name__)

try:  # ComfyUI puts these on sys.path; anywhere else they are absent.
    import comfy.model_management as model_management
    import comfy.model_patcher
    import comfy.utils
    import folder_paths
    from comfy.patcher_extension import CallbacksMP

    IN_COMFYUI = True
except ImportError:
    IN_COMFYUI = False

ALIGNER_FOLDER = "thinkdiff"
VLM_FOLDER = "LLM"
VISION_FOLDERS = ("clip_vision", ALIGNER_FOLDER)  # BLIP-2 vision towers: ComfyUI's folder, or next to the aligners
ALIGNER_EXTENSIONS = {".safetensors", ".pth", ".pt"}
_standalone_root: Path | None = None


# --- model folders -----------------------------------------------------------------------------------------------


def register_model_folders() -> None:
    """Add models/thinkdiff and models/LLM to ComfyUI's folders, after any path the user set for them in
    extra_model_paths.yaml (`folder_paths.add_model_folder_path` appends a path it does not have yet).

    No extensions are registered: a key ComfyUI did not know gets an empty extension set (every file), and the pack
    never asks ComfyUI to list these folders; it lists them itself (list_aligners filters by ALIGNER_EXTENSIONS,
    list_vlm_folders looks for config.json)."""
    if not IN_COMFYUI:
        return
    models_dir = Path(folder_paths.models_dir)
    for key in (ALIGNER_FOLDER, VLM_FOLDER):
        folder_paths.add_model_folder_path(key, str(models_dir / key))


def set_models_root(path: str | os.PathLike | None) -> None:
    """Standalone only: the folder holding `thinkdiff/` and `LLM/` (like ComfyUI's models folder)."""
    global _standalone_root
    _standalone_root = Path(path) if path is not None else None


def folder_paths_for(key: str) -> list[Path]:
    if IN_COMFYUI:
        return [Path(p) for p in folder_paths.get_folder_paths(key)]
    root = _standalone_root or Path(os.environ.get("THINKDIFF_MODELS_DIR", "models"))
    return [root / key]


def list_aligners() -> list[str]:
    names = set()
    for base in folder_paths_for(ALIGNER_FOLDER):
        if base.is_dir():
            names.update(
                p.relative_to(base).as_posix()
                for p in base.rglob("*")
                if p.is_file() and p.suffix.lower() in ALIGNER_EXTENSIONS
            )
    return sorted(names)


def list_vlm_folders() -> list[str]:
    """Hugging Face model folders (those with a config.json) up to two levels under each models/LLM path."""
    names = set()
    for base in folder_paths_for(VLM_FOLDER):
        if base.is_dir():
            for config in [*base.glob("*/config.json"), *base.glob("*/*/config.json")]:
                names.add(config.parent.relative_to(base).as_posix())
    return sorted(names)


def list_vision_encoders() -> list[str]:
    """BLIP-2 vision towers in models/clip_vision or models/thinkdiff: folders with a config.json, or single
    safetensors files written by `python -m thinkdiff_core extract-vision` (recognised by their header)."""
    from thinkdiff_core.vision import is_vision_tower_file

    names = set()
    for key in VISION_FOLDERS:
        for base in folder_paths_for(key):
            if not base.is_dir():
                continue
            for config in [*base.glob("*/config.json"), *base.glob("*/*/config.json")]:
                names.add(config.parent.relative_to(base).as_posix())
            for file in base.rglob("*.safetensors"):
                if is_vision_tower_file(file):
                    names.add(file.relative_to(base).as_posix())
    return sorted(names)


def aligner_path(name: str) -> Path:
    return _resolve((ALIGNER_FOLDER,), name, kind="file")


def vlm_path(name: str) -> Path:
    return _resolve((VLM_FOLDER,), name, kind="folder")


def vision_encoder_path(name: str) -> Path:
    return _resolve(VISION_FOLDERS, name, kind="file or folder")


def _resolve(keys: tuple[str, ...], name: str, kind: str) -> Path:
    """The path of `name` inside the first of the model folders `keys` that has it; `kind`: file, folder or both."""
    error = CheckpointError if kind == "file" else ModelFolderError
    where_names = " or ".join(f"models/{key}" for key in keys)
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise error(
            f"'{name}' is not a name inside {where_names}: names must be relative and stay inside the folder "
            f"(no absolute paths, no '..'). Choose one from the list."
        )
    bases = [base for key in keys for base in folder_paths_for(key)]
    for base in bases:
        candidate = base / name  # lexically inside base (no '..', not absolute); symlinked model folders still work
        if (kind != "folder" and candidate.is_file()) or (kind != "file" and candidate.is_dir()):
            return candidate
    where = ", ".join(str(b) for b in bases)
    raise error(
        f"'{name}' was not found in {where_names} ({where}). Put the {kind} there and press 'r' (refresh) in "
        f"ComfyUI, or fix extra_model_paths.yaml."
    )


# --- devices -----------------------------------------------------------------------------------------------------


def compute_device(requested: str = "auto") -> torch.device:
    """The device for "auto", "cuda" or "cpu", always with an index for cuda: ComfyUI compares devices with ==, and
    torch.device("cuda") != torch.device("cuda", 0), so an unindexed device would never evict FLUX."""
    if requested == "cpu":
        return torch.device("cpu")
    if IN_COMFYUI:
        return model_management.get_torch_device()
    if requested == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ThinkDiffError(
            f"device '{requested}' needs a CUDA GPU, but torch sees none (torch {torch.__version__}, CUDA build: "
            f"{torch.version.cuda or 'no'}). Choose device auto or cpu."
        )
    return torch.device("cuda", torch.cuda.current_device())


def offload_device() -> torch.device:
    if IN_COMFYUI:
        return model_management.text_encoder_offload_device()
    return torch.device("cpu")


def intermediate_device() -> torch.device:
    """Where ComfyUI's own text encoders leave their outputs (the CPU by default, the GPU with --gpu-only): node
    outputs go there too, so they combine with ComfyUI's conditioning and the sampler moves them once."""
    if IN_COMFYUI:
        return model_management.intermediate_device()
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" else torch.float16


def empty_cache() -> None:
    gc.collect()
    if IN_COMFYUI:
        model_management.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- models under model management ------------------------------------------------------------------------------


class _Holder(torch.nn.Module):
    """Wraps a model for ModelPatcher, which sets `.device` (read-only on transformers models)."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.wrapped = module
        self.device = device


@dataclass
class ManagedModel:
    """What a loader node outputs: the core object (`model`: a VlmBundle or a vision tower), its weights (`module`)
    and, inside ComfyUI, the ModelPatcher that lets ComfyUI load and evict it like its own models."""

    model: Any
    module: torch.nn.Module
    load_device: torch.device
    offload_device: torch.device
    patcher: Any = None
    movable: bool = True


def require_model(value: Any, wanted: type, input_name: str, loader: str) -> ManagedModel:
    """`value` if it is a loader's output holding a `wanted` model; else one line naming the node to connect (a
    wrong object reaches an input only through a hand-edited workflow or another pack's node)."""
    if not isinstance(value, ManagedModel) or not isinstance(value.model, wanted):
        held = type(value.model if isinstance(value, ManagedModel) else value).__name__
        raise ThinkDiffError(f"'{input_name}' got a {held}, not what {loader} outputs: connect {loader} to it.")
    return value


def manage(model: Any, module: torch.nn.Module, load_device: torch.device, movable: bool = True) -> ManagedModel:
    """Put a model loaded on the offload device under management; it goes to `load_device` only while in use.

    movable=False: weights that cannot change device (bitsandbytes), loaded on `load_device` and left there."""
    offload = offload_device()
    handle = ManagedModel(model=model, module=module, load_device=load_device, offload_device=offload, movable=movable)
    if IN_COMFYUI and movable:
        size = sum(p.numel() * p.element_size() for p in module.parameters())
        handle.patcher = comfy.model_patcher.ModelPatcher(
            _Holder(module, offload), load_device=load_device, offload_device=offload, size=size
        )
        release_buffers = getattr(model, "release_device_buffers", None)
        if release_buffers is not None:
            # ComfyUI detaches the model whenever it evicts it (for FLUX, say): what the core keeps on the device
            # for it (the fast engine's KV caches and CUDA graphs) is then stale and given back too. (A partial
            # unload calls no callback; the buffers then go at the next release, as before.)
            handle.patcher.add_callback(CallbacksMP.ON_DETACH, lambda patcher, unpatch_all: release_buffers())
    return handle


def load_to_device(handle: ManagedModel) -> None:
    """Put the model on its compute device; inside ComfyUI through model management, so it and FLUX evict each other."""
    if handle.patcher is not None:
        # Full load: plain transformers Linear layers cannot be partially offloaded by ComfyUI.
        model_management.load_models_gpu([handle.patcher], force_full_load=True)
    elif handle.movable:
        handle.module.to(handle.load_device)


def release(handle: ManagedModel) -> None:
    """Give the model's compute-device memory back (the weights stay loaded on the offload device), with what the
    core holds on the device for it (the fast engine's KV caches and CUDA graphs)."""
    release_buffers = getattr(handle.model, "release_device_buffers", None)
    if release_buffers is not None:
        release_buffers()
    if handle.patcher is not None:
        # Unload this model only: free_memory unloads every model on the device but those in keep_loaded, and takes
        # them off ComfyUI's list itself. Reading that list (model_management.current_loaded_models, never written
        # here) is the one internal left: checked on 0.3.64 (a125cd84) and 0.33.0 (783545f6), where 0.33's own
        # unload_model_and_clones does the same; 0.3.64 has no public helper that unloads one model.
        others = [loaded for loaded in model_management.current_loaded_models if loaded.model is not handle.patcher]
        model_management.free_memory(1e30, handle.patcher.load_device, keep_loaded=others)
    elif handle.movable:
        handle.module.to(handle.offload_device)
    empty_cache()


# --- progress and Cancel -----------------------------------------------------------------------------------------


def token_progress(total: int, description: str = "VLM tokens") -> Callable[[int], None]:
    """A callback for each generated token: raises on Cancel, then moves ComfyUI's progress bar (or tqdm).

    The Cancel check runs at every token on its own: since 0.33 ComfyUI throttles ProgressBar updates (at least
    100 ms apart), so the bar's hook is no reliable interrupt point."""
    if IN_COMFYUI:
        bar = comfy.utils.ProgressBar(total)

        def on_token(count: int) -> None:
            model_management.throw_exception_if_processing_interrupted()
            bar.update_absolute(count, total)

        return on_token
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, leave=False)

    def on_token(count: int) -> None:
        bar.update(count - bar.n)
        if count >= total:
            bar.close()

    return on_token
