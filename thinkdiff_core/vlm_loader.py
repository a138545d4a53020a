"""Loading the reasoning VLM from a local Hugging Face folder, and the bundle the rest of the pack passes around.

Never downloads. Refuses folders that would run their own code unless the user consents, falls back along the
attention backends, and loads 8-bit / 4-bit weights through bitsandbytes when asked.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from .errors import MissingDependencyError, ModelFolderError, ThinkDiffError, first_line
from .fast_decode import FastDecodeOptions, FastDecoder
from .hf_compat import dtype_kwargs, final_norm, import_transformers, model_class
from .images import DEFAULT_MAX_IMAGE_PIXELS

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("sdpa", "flash_attention_2", "eager")
try:  # transformers 5.x validates configs with huggingface_hub's strict dataclasses, whose errors are no ValueError
    from huggingface_hub.errors import StrictDataclassError

    CONFIG_VALIDATION_ERRORS: tuple[type[Exception], ...] = (StrictDataclassError,)
except ImportError:  # an older huggingface_hub (transformers 4.x): configs raise ValueError/TypeError
    CONFIG_VALIDATION_ERRORS = ()
QUANTIZATIONS = ("none", "8-bit", "4-bit")
ENGINES = ("auto", "fast", "generate")  # decode engines, see vlm.encode_with_vlm
_VISION_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


@dataclass
class VlmBundle:
    """A loaded VLM: the transformers model, its processor and where it came from."""

    model: Any
    processor: Any
    source_model: str
    path: Path | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    engine: str = "auto"  # the default decode engine of encode_with_vlm
    fast_options: FastDecodeOptions = field(default_factory=FastDecodeOptions)
    _fast: FastDecoder | None = field(default=None, init=False, repr=False)

    @property
    def hidden_size(self) -> int:
        return final_norm(self.model).weight.shape[0]

    def fast_decoder(self) -> FastDecoder:
        """The fast engine for this model, made once: its compiled code and CUDA graphs are reused across calls."""
        if self._fast is None or self._fast.model is not self.model:
            self._fast = FastDecoder(self.model, self.fast_options)
        return self._fast

    def release_device_buffers(self) -> None:
        """Give back what the fast engine holds on the device (KV caches, graphs); the model itself is untouched."""
        if self._fast is not None:
            self._fast.release()

    def eos_ids(self) -> list[int]:
        """The end-of-turn token ids generation stops at (the generation config's, else the tokenizer's)."""
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.processor.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

    def pad_id(self) -> int:
        """The id that pads rows after their EOS (the tokenizer's pad token, else the first EOS)."""
        pad = self.processor.tokenizer.pad_token_id
        return pad if pad is not None else (self.eos_ids() or [0])[0]

    def vision_token_ids(self) -> list[int]:
        """The model's vision placeholder ids: never a valid answer, so both engines suppress them."""
        ids = [getattr(self.model.config, name, None) for name in _VISION_TOKEN_FIELDS]
        return [token for token in ids if token is not None]


def load_vlm(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    quantization: str = "none",
    engine: str = "auto",
) -> VlmBundle:
    """Load a Hugging Face format VLM folder (config.json, weights, processor files). Never downloads.

    The attention backend falls back from flash_attention_2 to sdpa to eager when one is not available.
    quantization: "8-bit" or "4-bit" (NF4) loads the weights through bitsandbytes, straight onto a CUDA `device`, for
        12-16 GB cards; such weights cannot move between devices afterwards, and they decode with generate.
    engine: the bundle's default decode engine (see encode_with_vlm).
    """
    path = check_model_folder(path)
    _refuse_remote_code(path, trust_remote_code)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    transformers = import_transformers()
    quantized = quantization_kwargs(transformers, quantization, dtype, torch.device(device))
    try:
        config = transformers.AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (ValueError, OSError, KeyError, TypeError, *CONFIG_VALIDATION_ERRORS) as error:
        raise ModelFolderError(
            f"'{path}/config.json' is not a config transformers can read ({first_line(error)}). Download the "
            f"folder again, or update transformers if the model is newer than it."
        ) from error
    vlm_class = model_class(transformers, config.model_type)
    backends = (attn_implementation, "sdpa", "eager")  # the choice, then sdpa (flash-attn missing must not mean eager)
    last_error: Exception | None = None
    for backend in dict.fromkeys(backends):
        try:
            model, loading_info = vlm_class.from_pretrained(
                path,
                local_files_only=True,
                trust_remote_code=trust_remote_code,
                attn_implementation=backend,
                output_loading_info=True,
                **dtype_kwargs(dtype),
                **quantized,
            )
            break
        except (ImportError, ValueError) as error:
            if "Unrecognized configuration class" in str(error):
                raise ModelFolderError(
                    f"'{path}' holds a '{config.model_type}' model, not a vision-language model transformers can "
                    f"generate with. ThinkDiff-LVLM needs Qwen2-VL (e.g. Qwen2-VL-7B-Instruct): choose that folder."
                ) from error
            if "state dictionary of the model you are trying to load is corrupted" in str(error):
                # transformers 4.x: no tensor name fits the architecture (5.x reports them as missing instead)
                raise _foreign_weights(path, f"a {config.model_type} model") from error
            if not _is_attention_error(error):
                raise _load_error(path, error) from error
            logger.warning("attention backend %s is not available (%s); trying the next one", backend, error)
            last_error = error
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, OSError, SafetensorError, TypeError) as error:  # a size mismatch, a bad file or config
            raise _load_error(path, error) from error
    else:
        raise MissingDependencyError(f"no attention backend of {backends} could load '{path.name}': {last_error}")
    check_loading_info(loading_info, path, f"a {config.model_type} model")
    try:
        processor = transformers.AutoProcessor.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (ValueError, OSError, KeyError, TypeError) as error:
        raise ModelFolderError(
            f"the processor files in '{path}' could not be read ({first_line(error)}): tokenizer or preprocessor "
            f"files are missing or damaged. Download the whole repository again."
        ) from error
    if not quantized:  # bitsandbytes weights are placed by device_map and cannot be moved
        model.to(device)
    model.eval().requires_grad_(False)
    return VlmBundle(
        model=model,
        processor=processor,
        source_model=path.name,
        path=path,
        max_image_pixels=max_image_pixels,
        engine=engine,
    )


def quantization_kwargs(transformers, quantization: str, dtype: torch.dtype, device: torch.device) -> dict:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "none":
        return {}
    if device.type != "cuda":
        raise ThinkDiffError(
            f"{quantization} loading runs on a CUDA GPU only (bitsandbytes), but the VLM is to load on {device}. "
            "Choose quantization 'none' for a cpu load, or load on a cuda device."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise MissingDependencyError(
            f"{quantization} loading needs the bitsandbytes package: pip install bitsandbytes "
            "(in ComfyUI's Python), then restart. Or choose quantization 'none'."
        ) from error
    if quantization == "8-bit":
        config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    return {"quantization_config": config, "device_map": {"": str(device)}}


def check_model_folder(path: str | Path) -> Path:
    """Raise ModelFolderError unless `path` is a folder with a config.json and weights."""
    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(
            f"VLM folder '{path}' does not exist. Put the Hugging Face model folder (e.g. Qwen2-VL-7B-Instruct, "
            f"with config.json and *.safetensors) under models/LLM/."
        )
    if not (path / "config.json").is_file():
        raise ModelFolderError(
            f"'{path}' has no config.json: it is not a complete Hugging Face model folder. Download the whole repository."
        )
    weights = [*path.glob("*.safetensors"), *path.glob("*.bin"), *path.glob("*.safetensors.index.json")]
    if not weights:
        raise ModelFolderError(
            f"'{path}' has a config.json but no weights (*.safetensors). The download is incomplete: fetch the weight files too."
        )
    for index in path.glob("*.safetensors.index.json"):
        shards = sorted(set(read_weight_index(index).values()))
        absent = [name for name in shards if not (path / name).is_file()]
        if absent:
            raise ModelFolderError(
                f"'{path}' lacks {len(absent)} of the {len(shards)} weight files its index lists ({absent[:3]}). "
                f"The download is incomplete: fetch the missing files."
            )
    return path


def read_weight_index(index: Path) -> dict[str, str]:
    """A *.safetensors.index.json's weight_map (tensor name -> file name), refusing a damaged one and one that names
    files outside its own folder (a real index names the shards beside it)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = set(weight_map.values())
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError, OSError) as error:
        raise ModelFolderError(
            f"'{index}' is not a readable weight index ({first_line(error)}). Download that file again."
        ) from error
    outside = sorted(
        str(name) for name in names if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..")
    )
    if outside:
        raise ModelFolderError(
            f"'{index}' names weight files outside its folder ({outside[:3]}); a real index names files beside it. "
            f"Download that file again from the model's repository."
        )
    return weight_map


# A numbered transformer layer in a tensor name ('model.layers.27.', 'visual.blocks.3.', BLIP-2's 'encoder.layers.0.', T5's
# 'encoder.block.5.').
_LAYER_KEY = re.compile(r"(?:^|\.)(?:layers|blocks|block)\.\d+\.")
# Groups of state-dict keys, by the name of one of their dotted components, for messages: the first match names the part.
_KEY_PARTS = (("visual", "the vision tower"), ("vision_model", "the vision tower"), ("lm_head", "the output layer"))


def describe_keys(keys: list[str]) -> str:
    """A few keys of a long list, grouped by their first two components: 'model.visual.* (31 tensors)'."""
    groups: dict[str, int] = {}
    for key in keys:
        head = ".".join(key.split(".")[:2])
        groups[head] = groups.get(head, 0) + 1
    parts = [f"{head}.* ({count} tensor{'s' if count > 1 else ''})" for head, count in list(groups.items())[:4]]
    return ", ".join(parts) + (" ..." if len(groups) > 4 else "")


def check_loading_info(info: dict, path: Path, what: str) -> None:
    """Refuse a model whose weights do not fit its architecture. transformers leaves missing tensors randomly
    initialised and only prints a report, so a folder holding another model's weights (or missing the vision
    tower's) would load as a silently random model. Unexpected tensors alone (extra heads) are only logged."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [
        item[0] if isinstance(item, (tuple, list)) else str(item) for item in info.get("mismatched_keys") or []
    ]
    unexpected = sorted(info.get("unexpected_keys") or [])
    if missing or mismatched:
        keys = missing or mismatched
        part = next((name for word, name in _KEY_PARTS if all(word in key.split(".") for key in keys)), "")
        problem = "lack" if missing else "have the wrong shape for"
        other = f"; they hold other tensors instead ({describe_keys(unexpected)})" if unexpected else ""
        raise ModelFolderError(
            f"the weights in '{path}' {problem} {len(keys)} tensor(s) of {what}{f' ({part})' if part else ''}: "
            f"{describe_keys(keys)}{other}. The folder is incomplete or holds another model's weights: download the "
            f"whole repository again (every *.safetensors file) into that folder."
        )
    extra_layers = sorted({match.group(0) for key in unexpected if (match := _LAYER_KEY.search(key))})
    if extra_layers:
        raise ModelFolderError(
            f"the weights in '{path}' hold layers that {what}'s config.json does not have ({', '.join(extra_layers[:3])}"
            f"{' ...' if len(extra_layers) > 3 else ''}: {describe_keys(unexpected)}): config.json and the weights are of "
            f"different models, and the model would load with layers cut off. Download config.json again with the weights."
        )
    if unexpected:
        logger.warning(
            "'%s': ignoring %d tensor(s) the model does not use: %s", path, len(unexpected), describe_keys(unexpected)
        )


def _foreign_weights(path: Path, what: str) -> ModelFolderError:
    """The folder's weight files hold none of the architecture's tensors: name what they hold instead."""
    from safetensors import safe_open

    keys: list[str] = []
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                keys.extend(handle.keys())
        except (OSError, SafetensorError):
            continue
    held = f": they hold other tensors instead ({describe_keys(sorted(keys))})" if keys else ""
    return ModelFolderError(
        f"the weights in '{path}' lack every tensor of {what}{held}. The folder holds another model's weights: "
        f"download the whole repository again (every *.safetensors file) into that folder."
    )


# What transformers, torch and safetensors say of a weight file that is truncated, damaged or of other shapes.
_WEIGHT_WORDS = (
    "size mismatch",
    "deseriali",
    "incomplete metadata",
    "header",
    "safetensor",
    "unable to load weights",
    "invalid load key",
    "unexpected end",
    "truncated",
    "buffer length",
    "mismatched",
)
_DISK_WORDS = ("no space left", "permission denied", "read-only file system", "input/output error")


def _load_error(path: Path, error: BaseException) -> ThinkDiffError:
    """Name what from_pretrained's failure means: a missing package, a disk problem, a damaged weight file, or
    (anything else) a setting this transformers cannot load the folder with. Only the weight-shaped messages are
    blamed on the download."""
    text = str(error).lower()
    if isinstance(error, ImportError):
        return MissingDependencyError(
            f"loading '{path.name}' needs a package that is missing or too old ({first_line(error)}). Install it into "
            f"this Python (the message names it), then restart."
        )
    if isinstance(error, TypeError):  # a config value of the wrong type reaches a layer's constructor (4.x)
        return ModelFolderError(
            f"the model in '{path}' could not be built from its config.json ({first_line(error)}): a value there has "
            f"the wrong type. Download config.json again from the model's repository."
        )
    if isinstance(error, OSError) and any(word in text for word in _DISK_WORDS):
        return ModelFolderError(
            f"the weights in '{path}' could not be read from disk ({first_line(error)}). Check that the drive is "
            f"mounted and readable, and that the temp folder has free space."
        )
    if isinstance(error, (OSError, SafetensorError)) or any(word in text for word in _WEIGHT_WORDS):
        return ModelFolderError(
            f"the weights in '{path}' could not be loaded ({first_line(error)}): a weight file is truncated, "
            f"corrupt, or of another model (shapes that do not fit its config.json). Download the whole repository "
            f"again."
        )
    return ThinkDiffError(
        f"transformers could not load '{path.name}' with these settings ({first_line(error)}). Try dtype 'auto' and "
        f"quantization 'none', or update transformers if the folder is newer than it."
    )


def read_config_json(path: Path) -> dict:
    """A model folder's config.json as a dict; a damaged one is named (also for the BLIP-2 loader)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFolderError(
            f"'{path}/config.json' is not valid JSON ({error}): it is truncated or damaged. Download it again."
        ) from error
    if not isinstance(config, dict):
        raise ModelFolderError(f"'{path}/config.json' holds no JSON object: it is damaged. Download it again.")
    return config


def _refuse_remote_code(path: Path, trust_remote_code: bool) -> None:
    """A folder whose config maps classes to its own .py files would run that code: only with explicit consent."""
    config = read_config_json(path)
    if config.get("auto_map") and not trust_remote_code:
        raise ModelFolderError(
            f"'{path.name}' ships its own Python code (auto_map in config.json: {sorted(config['auto_map'])}); it was "
            f"not run. Qwen2-VL needs no custom code: use the official folder, or switch trust_remote_code on in the "
            f"loader only if you trust where this folder came from."
        )


def _is_attention_error(error: Exception) -> bool:
    text = str(error).lower()
    return any(word in text for word in ("attn", "attention", "flash", "sdpa"))
