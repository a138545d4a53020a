"""Standalone ThinkDiff generation without ComfyUI: model lookup, conditioning per mode, one image per prompt, on
any T5-XXL base diffusers runs (`base`: flux-dev, the paper's, flux-schnell, flux-krea, sd3.5-large, sd3.5-medium,
sd3.5-large-turbo, sd3-medium, chroma, pixart-sigma; thinkdiff_core.flux.BASES).

Three modes (the CLI's `--mode`, also used by the CoBSAT runner):

- `thinkdiff`: the paper's LVLM setting (recipe section 10): prompt_embeds = aligner(generated-token states),
  pooled = CLIP-L("") (on SD3: the CLIP-L/G block and pooled vector of "", then the aligned tokens). The VLM generates exactly `num_tokens` tokens (EOS suppressed, recipe section 5).
- `text`: the text bridge: the VLM's generated answer through the base's own text encoders (`pipe.encode_prompt`). The VLM
  stops at its end-of-turn token (as the TBDN baseline's "VLM writes a prompt" setup, protocol section 10).
- `hybrid`: the aligned tokens followed by the answer's T5 tokens, pooled from CLIP-L of the answer (the token order
  of ThinkDiff-CLIP: aligned tokens first, then text). The VLM stops at its end-of-turn token, so the aligned tokens
  and the text describe the same answer (the aligner was trained on such features, recipe section 5).

Models come from local folders or the Hugging Face cache only. A download happens only when the caller passes
`allow_download=True` for a repo id and HF_HUB_OFFLINE is not set; it is done explicitly with huggingface_hub and
logged, then the files are loaded from disk like any other folder.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .checkpoints import load_aligner
from .conditioning import DEFAULT_GUIDANCE, align_features, build_conditioning
from .errors import MissingDependencyError, ModelFolderError, ThinkDiffError, first_line
from .flux import BASES, DEFAULT_BASE, Base, empty_prompt_conditioning, render, text_conditioning
from .generation import GenerationSettings
from .prompts import chat_messages
from .vlm import encode_with_vlm
from .vlm_loader import VlmBundle, load_vlm

logger = logging.getLogger(__name__)

RENDER_MODES = ("thinkdiff", "text", "hybrid")  # what the image model is given: aligned tokens, the VLM's text, or both
# T5 length of the text part: the base's own default for text prompts (FLUX-dev: 512), and ThinkDiff-CLIP's 128
# when the text follows aligned tokens (recipe section 10).
TEXT_MAX_SEQUENCE_LENGTH = {"text": 512, "hybrid": 128}


# --- finding models ----------------------------------------------------------------------------------------------


def looks_like_repo_id(source: str) -> bool:
    """'owner/name' (no leading dot or slash, exactly one slash): a Hugging Face repo id rather than a path."""
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and "\\" not in source


def downloads_allowed(allow_download: bool) -> bool:
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")
    return allow_download and not offline


def resolve_model_folder(source: str | Path, what: str, allow_download: bool = False) -> Path:
    """A local folder for `source`: an existing folder, or a repo id found in the Hugging Face cache.

    what: a short name for messages ("FLUX pipeline", "VLM", "judge"). With allow_download (and HF_HUB_OFFLINE unset),
    a repo id missing from the cache is downloaded explicitly; otherwise ModelFolderError says how to get it.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    source = str(source)
    if not looks_like_repo_id(source) or path.parent.is_dir():  # 'models/FLUX.1-dev' with models/ here is a path
        raise ModelFolderError(
            f"{what} folder '{source}' does not exist. Pass the path of a downloaded Hugging Face model folder, or a "
            f"repo id such as 'owner/name' that is in the Hugging Face cache."
        )
    hub = _import_hub()
    try:
        return Path(hub.snapshot_download(source, local_files_only=True))
    except Exception as error:  # huggingface_hub raises several types for "not cached"
        cached_error = error
    if downloads_allowed(allow_download):
        logger.warning("downloading %s '%s' from the Hugging Face Hub (--allow-download)", what, source)
        try:
            return Path(hub.snapshot_download(source))
        except Exception as error:  # no network, no such repo, a gated repo, a full disk
            raise ModelFolderError(
                f"downloading {what} '{source}' failed ({first_line(error)}). Check the "
                f"repo id, your network and Hugging Face login (gated models need one), or download it yourself."
            ) from error
    raise ModelFolderError(
        f"{what} '{source}' is neither a local folder nor in the Hugging Face cache ({type(cached_error).__name__}). "
        f"Download it first (huggingface-cli download {source}) or pass its local folder; or add --allow-download "
        f"(with HF_HUB_OFFLINE unset) to let this command fetch it."
    )


def resolve_aligner_file(source: str | Path, allow_download: bool = False) -> Path:
    """A local aligner file: an existing path, or 'owner/name/file.pth' looked up in the Hugging Face cache."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    source = str(source)
    parts = source.split("/")
    if len(parts) < 3 or source.startswith((".", "/", "~")):
        raise ModelFolderError(
            f"aligner file '{source}' does not exist. Pass the path of an aligner (.safetensors, or the official "
            f"thinkdiff_lvlm.pth), or 'Mifucius/ThinkDiff/thinkdiff_lvlm.pth' if it is in the Hugging Face cache."
        )
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    hub = _import_hub()
    try:
        return Path(hub.hf_hub_download(repo_id, filename, local_files_only=True))
    except Exception as error:
        cached_error = error
    if downloads_allowed(allow_download):
        logger.warning("downloading aligner '%s' from '%s' (--allow-download)", filename, repo_id)
        return Path(hub.hf_hub_download(repo_id, filename))
    raise ModelFolderError(
        f"aligner '{filename}' of '{repo_id}' is not in the Hugging Face cache ({type(cached_error).__name__}). "
        f"Download it first (huggingface-cli download {repo_id} {filename}) or pass the file's path; or add "
        f"--allow-download (with HF_HUB_OFFLINE unset)."
    )


def _import_hub():
    try:
        import huggingface_hub
    except ImportError as error:
        raise MissingDependencyError(
            "looking up repo ids needs 'huggingface_hub': pip install huggingface_hub"
        ) from error
    return huggingface_hub


# --- loading -----------------------------------------------------------------------------------------------------


def get_base(base: str | Base) -> Base:
    """The Base for a name such as 'sd3.5-large' (see thinkdiff_core.flux.BASES)."""
    if isinstance(base, Base):
        return base
    if base not in BASES:
        raise ModelFolderError(f"unknown base '{base}'; choose one of {', '.join(BASES)}.")
    return BASES[base]


def _check_flux_variant(path: Path, base: Base) -> None:
    """FLUX.1 schnell and the guidance-distilled dev/Krea share FluxPipeline; the transformer's `guidance_embeds`
    tells them apart. Sampling one with the other's steps and guidance gives a poor image with no error."""
    import json

    if base.family != "flux":
        return
    try:
        distilled = json.loads((path / "transformer" / "config.json").read_text()).get("guidance_embeds")
    except (OSError, ValueError, AttributeError):
        return  # an unreadable transformer config is diffusers' to name when it loads
    if distilled is False and base.guidance is not None:
        raise ModelFolderError(
            f"'{path}' is FLUX.1 schnell (no guidance embedding), but base '{base.name}' samples as a "
            f"guidance-distilled model: pass --base flux-schnell."
        )
    if distilled is True and base.guidance is None:
        raise ModelFolderError(
            f"'{path}' is a guidance-distilled FLUX.1 (dev or Krea), but base '{base.name}' samples as schnell: pass "
            f"--base flux-dev (or flux-krea for FLUX.1-Krea-dev)."
        )


def load_base_pipeline(
    source: str | Path,
    base: str | Base = DEFAULT_BASE,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    allow_download: bool = False,
    cpu_offload: bool = False,
):
    """The diffusers pipeline of `base` (FluxPipeline, StableDiffusion3Pipeline, ChromaPipeline,
    PixArtSigmaPipeline) from a local folder (model_index.json + components) or a cached repo id."""
    import json

    base = get_base(base)
    path = resolve_model_folder(source, f"{base.name} pipeline", allow_download)
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelFolderError(
            f"'{path}' has no model_index.json: it is not a diffusers pipeline folder. Use the whole {base.repo} "
            f"repository (a single .safetensors transformer file is not enough here)."
        )
    found = json.loads(index.read_text()).get("_class_name")
    if found != base.pipeline_class:
        others = [name for name, other in BASES.items() if other.pipeline_class == found]
        hint = f"pass --base {others[0]}" if others else f"pass the {base.repo} folder"
        raise ModelFolderError(
            f"'{path}' holds a {found}, but base '{base.name}' needs a {base.pipeline_class}: {hint}."
        )
    _check_flux_variant(path, base)
    try:
        import diffusers
    except ImportError as error:
        raise MissingDependencyError("standalone generation needs diffusers: pip install 'diffusers>=0.39'") from error
    pipeline_class = getattr(diffusers, base.pipeline_class, None)
    if pipeline_class is None:
        raise MissingDependencyError(
            f"this diffusers ({diffusers.__version__}) has no {base.pipeline_class}: pip install -U diffusers "
            f"(0.42 has every base)."
        )
    with warnings.catch_warnings():  # newer diffusers rename torch_dtype to dtype; the old name works in all >= 0.39
        warnings.simplefilter("ignore", FutureWarning)
        pipe = pipeline_class.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_flux_pipeline(
    source: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    allow_download: bool = False,
    cpu_offload: bool = False,
):
    """diffusers FluxPipeline from a local folder (model_index.json + components) or a cached repo id."""
    return load_base_pipeline(source, "flux-dev", dtype, device, allow_download, cpu_offload)


@dataclass
class ThinkDiffModels:
    """Everything one generation needs: the VLM, the aligner (unused in text mode) and the base's pipeline."""

    vlm: VlmBundle
    aligner: Any | None
    pipe: Any
    base: Base = BASES[DEFAULT_BASE]


def load_models(
    vlm: str | Path,
    flux: str | Path,
    aligner: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_download: bool = False,
    cpu_offload: bool = False,
    base: str | Base = DEFAULT_BASE,
) -> ThinkDiffModels:
    """Load the three models; the aligner may be None only when every generation uses the text mode.

    flux: the diffusers pipeline folder (or cached repo id) of `base` (a name in thinkdiff_core.flux.BASES).
    """
    base = get_base(base)
    vlm_bundle = load_vlm(resolve_model_folder(vlm, "VLM", allow_download), dtype=dtype, device=device)
    aligner_model = None
    if aligner is not None:
        aligner_model = load_aligner(resolve_aligner_file(aligner, allow_download), device=device, dtype=dtype)
    pipe = load_base_pipeline(
        flux, base, dtype=dtype, device=device, allow_download=allow_download, cpu_offload=cpu_offload
    )
    return ThinkDiffModels(vlm=vlm_bundle, aligner=aligner_model, pipe=pipe, base=base)


# --- conditioning per mode ---------------------------------------------------------------------------------------


def vlm_settings(mode: str, settings: GenerationSettings) -> GenerationSettings:
    """The generation settings a mode needs: thinkdiff keeps exactly num_tokens tokens, text/hybrid stop at EOS."""
    check_mode(mode)
    from dataclasses import replace

    return replace(settings, stop_at_eos=mode != "thinkdiff")


def mode_conditioning(
    pipe,
    aligned: torch.Tensor | None,
    text: str,
    mode: str,
    guidance: float | None = DEFAULT_GUIDANCE,
    text_tokens: int | None = None,
) -> list[list]:
    """The CONDITIONING for a mode (see the module docstring), in the family of `pipe`'s base.

    aligned: (1, tokens, 4096) aligner output (ignored by `text`); text: the VLM's generated answer (ignored by
    `thinkdiff`); guidance: FLUX's distilled guidance (stored in the conditioning; other bases ignore it);
    text_tokens: T5 length of a text prompt in mode text (default 512, FLUX-dev's). FLUX returns
    [[cond (1, seq, 4096), {"pooled_output": (1, 768), "guidance": guidance}]].
    """
    check_mode(mode)
    if mode != "text" and aligned is None:
        raise ValueError(f"mode {mode!r} needs the aligned tokens")
    if mode == "thinkdiff":
        return build_conditioning(aligned, base=empty_prompt_conditioning(pipe, guidance), mode="replace")
    length = TEXT_MAX_SEQUENCE_LENGTH[mode] if mode == "hybrid" or text_tokens is None else text_tokens
    base = text_conditioning(pipe, text, guidance, max_sequence_length=length)
    if mode == "text":
        return base
    return build_conditioning(aligned, base=base, mode="prepend")


def check_mode(mode: str) -> None:
    if mode not in RENDER_MODES:
        raise ValueError(f"mode must be one of {RENDER_MODES}, got {mode!r}")


# --- one generation ----------------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    """One generated image with the VLM's text and how long each stage took (seconds)."""

    image: Image.Image
    text: str
    conditioning: list = field(repr=False)
    timings: dict[str, float] = field(default_factory=dict)


def generate(
    models: ThinkDiffModels,
    content: list[dict],
    mode: str = "thinkdiff",
    settings: GenerationSettings = GenerationSettings(),
    steps: int | None = None,
    guidance: float | None = None,
    width: int = 1024,
    height: int = 1024,
    seed: int = 42,
    add_vision_id: bool = False,
) -> GenerationResult:
    """VLM -> (aligner) -> the base model for one user turn `content` (from thinkdiff_core.prompts: layout_content or
    cobsat_content), on the base `models` were loaded for.

    steps, guidance: None takes the base's defaults (flux-dev: 28 and distilled guidance 3.5; sd3.5-large: 28 and
    CFG 3.5; ...); guidance is FLUX's distilled guidance, or the other bases' classifier-free guidance scale.
    add_vision_id: "Picture k:" labels, for the in-context (CoBSAT) layout only (recipe section 6).
    """
    check_mode(mode)
    if mode != "text" and models.aligner is None:
        raise ModelFolderError(f"mode '{mode}' needs an aligner: pass --aligner (e.g. thinkdiff_lvlm.pth).")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    features = encode_with_vlm(
        models.vlm, chat_messages(content), vlm_settings(mode, settings), add_vision_id=add_vision_id
    )
    timings["vlm"] = time.perf_counter() - started
    aligned = None
    if mode != "text":
        started = time.perf_counter()
        aligned = align_features(models.aligner, features)
        timings["aligner"] = time.perf_counter() - started
    started = time.perf_counter()
    text = features.text[0].strip()
    base = models.base
    steps = base.steps if steps is None else steps
    guidance = base.guidance if guidance is None else guidance
    distilled = guidance if base.family == "flux" else None
    conditioning = mode_conditioning(models.pipe, aligned, text, mode, distilled, text_tokens=base.text_tokens)
    image = render(
        models.pipe,
        conditioning,
        steps=steps,
        seed=seed,
        width=width,
        height=height,
        guidance=None if base.family == "flux" else guidance,
    )
    timings["flux"] = time.perf_counter() - started  # the image model's time, whichever base (key kept for records)
    return GenerationResult(image=image, text=text, conditioning=conditioning, timings=timings)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name: str | None) -> str:
    """`name` (a --device value) when this machine has that device, else the default; one line naming the fix
    otherwise (torch's own error is 'Found no NVIDIA driver', raised minutes later, after the models load)."""
    if not name:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise ThinkDiffError(
            f"--device {name!r} is not a device torch knows ({error}): use cuda, cuda:1 or cpu."
        ) from error
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ThinkDiffError(
                f"--device {name} needs a CUDA GPU, but torch sees none (torch {torch.__version__}, CUDA build: "
                f"{torch.version.cuda or 'no'}): use --device cpu, or a torch build for your GPU."
            )
        if device.index is not None and device.index >= count:
            raise ThinkDiffError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}.")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ThinkDiffError(f"--device {name}: this machine has no Apple MPS device: use --device cpu.")
    return name
