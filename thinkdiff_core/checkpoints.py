"""Aligner files: this project's safetensors format, and import of the official `.pth` release.

Our format: a safetensors file with keys `linear_in.{weight,bias}`, `linear_out.{weight,bias}`, `norm.weight`
and the spec in the header metadata (`thinkdiff.*` keys, all strings, see `METADATA_KEYS`).

Official format (recipe section 3): a pickle `{"model": state_dict, ...}` whose aligner keys are
`mm_projector.0/2/3.*`. Pickles are loaded only with `weights_only=True`, so a file that would run code
is refused, not executed. This module is the only place that knows the official key names.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .aligner import AlignerSpec, ThinkDiffAligner
from .errors import CheckpointError, UnsafeCheckpointError
from .files import same_file, write_atomic

FORMAT_VERSION = 1
METADATA_KEYS = (
    "format_version", "variant", "input_dim", "output_dim", "source_model", "num_tokens", "vlm_model_type",
)  # fmt: skip
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

# Official key -> our key. Index 1 of the official nn.Sequential is the GELU, which has no weights.
_OFFICIAL_TO_OURS = {
    "mm_projector.0.weight": "linear_in.weight",
    "mm_projector.0.bias": "linear_in.bias",
    "mm_projector.2.weight": "linear_out.weight",
    "mm_projector.2.bias": "linear_out.bias",
    "mm_projector.3.weight": "norm.weight",
}
_OUR_KEYS = tuple(_OFFICIAL_TO_OURS.values())

# Variant by input width, for files that carry no metadata (the official release).
_KNOWN_WIDTHS = {3584: ("lvlm", "Qwen/Qwen2-VL-7B-Instruct"), 1408: ("clip", "Salesforce/blip2-flan-t5-xxl")}


def save_aligner(
    aligner: ThinkDiffAligner, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None
) -> Path:
    """Write `aligner` as safetensors with its spec in the header. The write is atomic (temp file + rename)."""
    tensors = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in aligner.state_dict().items()}
    metadata = {f"thinkdiff.{key}": str(value) for key, value in aligner.spec.to_dict().items()}
    metadata["thinkdiff.format_version"] = str(FORMAT_VERSION)
    for key, value in (extra_metadata or {}).items():
        metadata[key if key.startswith("thinkdiff.") else f"thinkdiff.{key}"] = str(value)
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_aligner(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    variant: str | None = None,
) -> ThinkDiffAligner:
    """Load an aligner from this project's safetensors or from an official `.pth`; return it in eval mode.

    `variant` overrides the variant for files without metadata whose width is not one of the released ones.
    """
    state, metadata = read_aligner_state(path)
    spec = spec_from_state_dict(state, metadata, variant=variant, file_name=Path(path).name)
    check_weights(state, Path(path).name)
    aligner = ThinkDiffAligner(spec)
    aligner.load_state_dict(state, strict=True)
    return aligner.to(device=device, dtype=dtype).eval().requires_grad_(False)


def read_aligner_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return (state dict with our key names, `thinkdiff.*` metadata without the prefix) for any supported file."""
    path = _check_file(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raw, metadata = _read_official_pickle(path), {}
    elif path.suffix.lower() == ".safetensors" or _looks_like_safetensors(path):
        raw, metadata = _read_safetensors(path)
    else:
        raise CheckpointError(
            f"'{path.name}' is neither safetensors nor a PyTorch .pth file. Aligners are '.safetensors' files "
            f"(this project) or the official 'thinkdiff_lvlm.pth' / 'thinkdiff_clip.pth'."
        )
    return _to_our_keys(raw, path.name), metadata


def spec_from_state_dict(
    state: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    variant: str | None = None,
    file_name: str = "aligner",
) -> AlignerSpec:
    """The one place that decides an aligner's spec: from the header if present, else from the weight shapes."""
    output_dim, input_dim = state["linear_in.weight"].shape
    expected = {
        "linear_in.bias": (output_dim,),
        "linear_out.weight": (output_dim, output_dim),
        "linear_out.bias": (output_dim,),
        "norm.weight": (output_dim,),
    }
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise CheckpointError(
                f"'{file_name}': {key} has shape {tuple(state[key].shape)}, expected {shape} for an aligner "
                f"{input_dim} -> {output_dim}. The file is damaged or not a ThinkDiff aligner."
            )
    metadata = metadata or {}
    if metadata.get("variant"):
        _check_metadata_dims(metadata, input_dim, output_dim, file_name)
        return AlignerSpec(
            variant=variant or metadata["variant"],
            input_dim=input_dim,
            output_dim=output_dim,
            source_model=metadata.get("source_model", ""),
            num_tokens=int(metadata.get("num_tokens", 128)),
            vlm_model_type=metadata.get("vlm_model_type", ""),
        )
    known_variant, source_model = _KNOWN_WIDTHS.get(input_dim, (None, ""))
    if variant is None and known_variant is None:
        raise CheckpointError(
            f"'{file_name}' has no ThinkDiff metadata and an input width of {input_dim}, which matches no released "
            f"aligner (3584 = lvlm for Qwen2-VL-7B, 1408 = clip for BLIP-2). Pass variant='lvlm' or 'clip' to load it."
        )
    variant = variant or known_variant
    return AlignerSpec(
        variant=variant,
        input_dim=input_dim,
        output_dim=output_dim,
        source_model=source_model,
        # the released LVLM aligner was trained on Qwen2-VL-7B-Instruct (recipe section 1)
        vlm_model_type="qwen2_vl" if variant == known_variant == "lvlm" else "",
    )


def convert_official(src: str | os.PathLike, dst: str | os.PathLike, variant: str | None = None) -> Path:
    """Convert an official `thinkdiff_*.pth` to this project's safetensors format; return the new path.

    The output may never be the input (the same path, a symlink or a hard link to it): the source is never touched.
    The new file is written under a temp name, read back and compared with the source's weights, then renamed.
    """
    src, dst = Path(src), Path(dst)
    if same_file(src, dst):
        raise CheckpointError(
            f"convert: the output '{dst}' is the input file itself; converting would replace the original. "
            f"Give another output name, e.g. '{src.stem}-converted.safetensors'."
        )
    if dst.suffix.lower() != ".safetensors":
        raise CheckpointError(
            f"convert: the output '{dst.name}' must end in .safetensors (the format written); e.g. "
            f"'{dst.with_suffix('.safetensors').name}'."
        )
    aligner = load_aligner(src, variant=variant)
    expected = aligner.state_dict()

    def verified_save(tmp: Path) -> None:
        save_aligner(aligner, tmp, extra_metadata={"converted_from": src.name})
        written, _ = _read_safetensors(tmp)
        if set(written) != set(expected) or any(not torch.equal(written[k], expected[k].float()) for k in expected):
            raise CheckpointError(
                f"convert: '{dst.name}' read back differently from what was written (a failing disk?); "
                f"nothing was replaced. Try another output folder."
            )

    return write_atomic(dst, verified_save)


def check_weights(state: dict[str, torch.Tensor], file_name: str) -> None:
    """Refuse weights that cannot be an aligner's: not floating point (int8, bool: a quantized or foreign file), or
    holding NaN/inf (a diverged or damaged training), which would only surface later as a NaN picture."""
    for key, value in state.items():
        if not value.is_floating_point():
            raise CheckpointError(
                f"'{file_name}': {key} holds {str(value.dtype).removeprefix('torch.')} values; an aligner's weights "
                f"are floating point (float32/bfloat16/float16). The file is quantized, damaged or not an aligner: "
                f"use the released file or re-export it."
            )
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise CheckpointError(
                f"'{file_name}': {key} holds {bad} NaN/inf value(s); the aligner was damaged or its training "
                f"diverged. Use an earlier or the released aligner file."
            )


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `thinkdiff.*` header of a safetensors aligner (prefix stripped); {} for other files."""
    path = _check_file(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return {}
    return _read_safetensors(path)[1]


# --- internals -------------------------------------------------------------------------------------------------


def _check_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"aligner file '{path}' does not exist. Put the file in models/thinkdiff (or pass its full path)."
        )
    if path.is_dir():
        raise CheckpointError(
            f"'{path}' is a directory; an aligner is a single '.safetensors' or '.pth' file. Choose the file inside it."
        )
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"'{path.name}' is empty (0 bytes), probably an interrupted download or copy. Download it again."
        )
    return path


def _looks_like_safetensors(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"'{path.name}' is not a readable safetensors file ({error}). It is probably truncated or corrupt: "
            f"download or export it again."
        ) from error
    metadata = {key.removeprefix("thinkdiff."): value for key, value in header.items() if key.startswith("thinkdiff.")}
    return state, metadata


def _read_official_pickle(path: Path) -> dict[str, torch.Tensor]:
    with path.open("rb") as handle:
        head = handle.read(4)
    # torch.save writes a zip archive (PK\x03\x04); the legacy format and plain pickles start with the PROTO opcode.
    if not (
        head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
    ):
        raise CheckpointError(
            f"'{path.name}' is not a PyTorch checkpoint at all: it is neither a zip archive (torch.save) nor a pickle "
            f"(it starts with bytes {head.hex()}). It is corrupt or another kind of file: download the aligner again."
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = next((line.strip() for line in str(error).splitlines() if "Unsupported global" in line), "")
        if reason:
            raise UnsafeCheckpointError(
                f"refused to load '{path.name}': it holds pickled objects that only load by running code "
                f"({reason.removeprefix('WeightsUnpickler error: ')[:160]}). Nothing in it was run. The official "
                f"ThinkDiff checkpoints load safely; get the file from its original source, or convert a trusted "
                f"copy to safetensors."
            ) from error
        lines = str(error).splitlines() or [""]
        detail = next((line.strip() for line in lines if "Unsupported" in line), lines[0])
        raise UnsafeCheckpointError(
            f"refused to load '{path.name}': it is a pickle the safe (weights-only) loader cannot read ({detail}); "
            f"it is damaged or needs to run code to load. Nothing in it was run. Get the file from its original "
            f"source again."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as error:
        raise CheckpointError(
            f"'{path.name}' could not be read as a PyTorch checkpoint ({error}). It is probably truncated or corrupt: "
            f"download it again."
        ) from error
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict):
        raise CheckpointError(
            f"'{path.name}' holds a {type(loaded).__name__}, not a state dict: it is not a ThinkDiff aligner."
        )
    return {key.removeprefix("module."): value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def _to_our_keys(raw: dict[str, torch.Tensor], file_name: str) -> dict[str, torch.Tensor]:
    if all(key in raw for key in _OUR_KEYS):
        return {key: raw[key] for key in _OUR_KEYS}
    if all(key in raw for key in _OFFICIAL_TO_OURS):
        return {ours: raw[official] for official, ours in _OFFICIAL_TO_OURS.items()}
    found = sorted(raw)[:6]
    raise CheckpointError(
        f"'{file_name}' is not a ThinkDiff aligner: expected keys {list(_OUR_KEYS)} (or the official "
        f"'mm_projector.0/2/3' keys), found {found}{' ...' if len(raw) > 6 else ''}. "
        f"Choose an aligner file (thinkdiff_lvlm / thinkdiff_clip), not a VLM, T5 or FLUX checkpoint."
    )


def _check_metadata_dims(metadata: dict[str, str], input_dim: int, output_dim: int, file_name: str) -> None:
    for key, actual in (("input_dim", input_dim), ("output_dim", output_dim)):
        if key in metadata and int(metadata[key]) != actual:
            raise CheckpointError(
                f"'{file_name}': header says {key}={metadata[key]} but the weights have {actual}. "
                f"The file was edited or damaged; export it again."
            )
