"""One flat config for feature extraction and aligner training; defaults are the paper's recipe.

Precedence: these defaults < the YAML file < `--set key=value` < the dedicated flags (`--output-dir`, `--max-steps`).
Unknown keys are errors (a typo must not silently fall back to a default). Relative paths are relative to the
working directory. Recipe section numbers refer to docs/reference thinkdiff-recipe.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from thinkdiff_core.dtypes import TORCH_DTYPES
from thinkdiff_core.errors import ThinkDiffError

logger = logging.getLogger("thinkdiff.config")

# Keys renamed since configs were first published: old name -> new name. User configs are a public API, so a file or
# --set that still says the old name keeps working, with a warning naming the new key.
RENAMED_KEYS = {"features": "feature_source"}  # "features" read as a tensor next to features_dir


class ConfigError(ThinkDiffError):
    """A config file or override is missing, malformed or names an unknown key."""


def _at_least(minimum):
    return lambda value: value >= minimum


# Ranges every Config is checked against on construction: key -> (accepts the value, the rule, how to fix it). A bad
# value must fail before any model loads (a negative learning rate trains, silently, the wrong way).
VALUE_RULES = {
    "learning_rate": (lambda v: v > 0, "must be > 0", "the recipe uses 1e-4."),
    "max_steps": (_at_least(1), "must be at least 1", "a run trains for at least one step (the recipe: 25000)."),
    "beta1": (lambda v: 0 <= v < 1, "must be in [0, 1)", "AdamW's beta1; the recipe uses 0.9."),
    "beta2": (lambda v: 0 <= v < 1, "must be in [0, 1)", "AdamW's beta2; the recipe uses 0.999."),
    "weight_decay": (lambda v: v < 1, "must be in [0, 1)", "the recipe uses 0.05."),
    "temperature": (lambda v: v > 0, "must be > 0", "the recipe samples with 0.6."),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]", "the recipe samples with 0.9."),
    "max_image_pixels": (_at_least(28 * 28), "must be at least 784 (28 x 28)", "the default is 1003520."),
    "clip_text_tokens": (_at_least(2), "must be at least 2 (a token and </s>)", "the recipe uses 32."),
    **{
        key: (_at_least(1), "must be at least 1", "set a positive whole number (see train/config.py).")
        for key in (
            "batch_size",
            "gradient_accumulation_steps",
            "max_prefix_tokens",
            "max_target_tokens",
            "max_input_tokens",
            "samples_per_shard",
            "extract_batch_size",
            "max_new_tokens",
            "caption_max_words",
            "vision_downsample_factor",
            "bucket_window",
            "pad_to_multiple",
            "lr_decay_steps",
            "log_every",
            "val_batches",
            "checkpoint_every",
        )
    },
}


@dataclass(frozen=True)
class Config:
    """Every setting of a run, read once. Frozen, so that what the trackers and the exported header record is what
    every module used: no part can change a setting behind the others' backs. Vary one with dataclasses.replace."""

    # --- what to train ---------------------------------------------------------------------------------------
    variant: str = "lvlm"  # "lvlm" (VLM generated-token features) or "clip" (BLIP-2 vision tokens + caption)
    output_dir: str = "runs/thinkdiff"
    seed: int = 42

    # --- frozen models: local Hugging Face folders (nothing is downloaded) --------------------------------------
    t5_path: str = ""  # google/flan-t5-xxl: proxy decoder (both variants) and text encoder (clip), recipe section 1
    vlm_path: str = ""  # Qwen/Qwen2-VL-7B-Instruct (lvlm feature extraction)
    vision_path: str = ""  # Salesforce/blip2-flan-t5-xxl, only its vision tower is read (clip)
    frozen_dtype: str = "bfloat16"  # frozen T5 / vision tower / VLM in bf16 (recipe section 9)

    # --- data -----------------------------------------------------------------------------------------------------
    # Image + caption sources: webdataset .tar shards (globs and {000..123} ranges allowed), a folder of images with
    # same-name .txt captions, or a .jsonl of {"image": path, "caption": text}.
    train_data: tuple[str, ...] = ()
    val_data: tuple[str, ...] = ()  # empty: hold out the last `val_samples` training samples
    val_samples: int = 1000
    features_dir: str = ""  # lvlm: where extract_features.py writes its shards and training reads them

    # --- feature extraction (extract_features.py), recipe sections 4-6 -----------------------------------------
    extract_batch_size: int = 16
    max_new_tokens: int = 256
    temperature: float = 0.6
    top_p: float = 0.9
    samples_per_shard: int = 500
    feature_dtype: str = "bfloat16"  # the official precompute stored bf16
    keep_prompt_states: bool = False  # also store prompt-token states, for the input-token ablation
    max_image_pixels: int = 1280 * 28 * 28  # the official run used native resolution; this caps very large images

    # --- the proxy task, recipe section 8 ---------------------------------------------------------------------------
    split: bool = True  # ablation False: the whole sequence in, the whole sequence out
    feature_source: str = "generated"  # ablation "input": prompt-token states instead of generated-token states
    norm_init: str = "t5"  # ablation "ones": the aligner norm keeps its default all-ones init (paper Fig. 7)
    max_prefix_tokens: int = 128  # s is drawn from 1..min(L-1, 128)
    max_target_tokens: int = 128  # T5 target tokens, </s> included
    max_input_tokens: int = 1024  # input-token ablation: keep the FIRST this many prompt states (official collater)
    caption_max_words: int = 50  # clip: caption cleaning
    clip_text_tokens: int = 32  # clip: cap on each caption part, </s> included
    vision_downsample_factor: int = 2  # clip: 16x16 patches -> 8x8, 65 tokens per image (recipe section 7)

    # --- optimisation, recipe section 9 ---------------------------------------------------------------------------
    batch_size: int = 32  # per process and micro-step
    gradient_accumulation_steps: int = 1
    max_steps: int = 25000
    learning_rate: float = 1e-4
    min_learning_rate: float = 8e-5
    warmup_start_learning_rate: float = 1e-6
    warmup_steps: int = 2000
    lr_decay_steps: int = 200000  # cosine length after warmup (40 x 5000 in the official config)
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    mixed_precision: str = "bf16"  # "bf16", "fp16" or "no" (CPU runs: "no")

    # --- speed (train/README.md, "Speed"): the samples seen per window of steps stay the same -------------------
    # Bucketing groups samples of similar prefix and target length into the same global batch (less padding). The
    # lengths come from the token ids and the seeded split, so no feature is read to group them. With bucketing the
    # step's loss is divided by a fixed token budget (batch_size x max target tokens) instead of the batch's own
    # token count: every target token then weighs the same whatever the batch holds, as in random batches.
    length_bucketing: bool = True  # false: the plain seeded order and per-batch token mean of earlier versions
    bucket_window: int = 256  # steps whose global batches are grouped together (at most one epoch)
    pad_to_multiple: int = 8  # sequence lengths are padded up to a multiple of this: few distinct shapes
    compile: bool = False  # torch.compile each frozen T5 block and the output-layer loss (regional compilation)
    compile_backend: str = "inductor"  # torch.compile backend; "aot_eager" checks the compiled graphs on a CPU

    # --- bookkeeping ----------------------------------------------------------------------------------------------
    log_every: int = 10
    eval_every: int = 1000  # 0: no validation at all
    val_batches: int = 20
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3  # the newest this many are kept; 0 keeps every checkpoint
    num_workers: int = 4
    report_to: str = "tensorboard"  # an accelerate tracker name, or "none"

    def __post_init__(self) -> None:
        # Path lists as tuples whatever they were built from, so the frozen config is hashable and cannot change.
        for item in dataclasses.fields(self):
            if isinstance(getattr(self, item.name), list):
                object.__setattr__(self, item.name, tuple(getattr(self, item.name)))
        # Checked on construction, so that no Config holds a value the scripts would misread.
        choices = {"variant": ("lvlm", "clip"), "feature_source": ("generated", "input"), "norm_init": ("t5", "ones")}
        choices["mixed_precision"] = ("no", "bf16", "fp16")
        choices["frozen_dtype"] = choices["feature_dtype"] = tuple(TORCH_DTYPES)
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}: {getattr(self, key)!r} is not one of {allowed}")
        for key, (accept, rule, fix) in VALUE_RULES.items():
            if not accept(getattr(self, key)):
                raise ConfigError(f"{key} {rule}, got {getattr(self, key)!r}: {fix}")
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(
                    f"{item.name} must be a finite number, got {value}; set a real value (see train/config.py)."
                )
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ConfigError(f"{item.name} must not be negative, got {value}; set it to 0 or more.")
        if not self.val_data and self.val_samples < 1:
            raise ConfigError(
                "val_samples must be at least 1 when val_data is empty (the held-out set): set val_samples or val_data."
            )
        if self.variant == "clip" and self.feature_source != "generated":
            raise ConfigError(
                "feature_source='input' is an ablation of the lvlm variant; the clip variant has no VLM features"
            )


def load_config(path: str | Path | None, overrides: list[str] = (), **explicit) -> Config:
    """Defaults, then the YAML file at `path`, then `key=value` overrides, then `explicit` values that are not None."""
    values: dict = {}
    if path is not None:
        path = config_path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"'{path}' is not valid YAML: {' '.join(str(error).split())}. Fix its syntax.") from error
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(
                f"config file '{path}' could not be read ({error}); give a readable YAML file."
            ) from error
        if not isinstance(loaded, dict):
            raise ConfigError(f"'{path}' must hold a mapping of config keys, got a {type(loaded).__name__}")
        values.update(_renamed(loaded, str(path)))
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {override!r} (e.g. --set batch_size=8)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(
                f"--set {override!r}: the value is not valid YAML ({' '.join(str(error).split())}); quote it."
            ) from error
        values.update(_renamed({key.strip(): value}, "--set"))
    values.update({key: value for key, value in explicit.items() if value is not None})
    return Config(**_coerce(values))


def config_path(name: str | Path) -> Path:
    """A config file: a path as given, else one of the shipped configs by its name (`--config tiny.yaml` works
    wherever the package is installed, as `train/configs/tiny.yaml` does in the checkout)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"config '{path}' is a folder and could not be read as YAML; give the .yaml file inside it.")
    shipped = Path(__file__).resolve().parent / "configs"
    if path.parent == Path(".") and (shipped / path.name).is_file():
        return shipped / path.name
    names = ", ".join(sorted(file.name for file in shipped.glob("*.yaml") if not file.name.startswith("accelerate")))
    raise ConfigError(f"config file '{path}' not found. Give a path, or the name of a shipped config: {names}.")


def _renamed(values: dict, where: str) -> dict:
    """`values` with the old names of RENAMED_KEYS replaced by the new ones, each use logged; both names with
    different values in one place is an error (which one was meant?)."""
    out = {key: value for key, value in values.items() if key not in RENAMED_KEYS}
    for old, new in RENAMED_KEYS.items():
        if old not in values:
            continue
        instead = f"--set {new}={values[old]}" if where == "--set" else f"{new}: {values[old]}"
        logger.warning(
            "%s: config key %r is deprecated, it is now %r (same values): write %s", where, old, new, instead
        )
        if new in values and values[new] != values[old]:
            raise ConfigError(f"{where} sets both {old}={values[old]!r} and {new}={values[new]!r}; keep only {new}.")
        out[new] = values[old]
    return out


def _coerce(values: dict) -> dict:
    hints = typing.get_type_hints(Config)
    names = [item.name for item in dataclasses.fields(Config)]
    out = {}
    for key, value in values.items():
        if key not in hints:
            close = difflib.get_close_matches(key, names, n=3)
            raise ConfigError(
                f"unknown config key {key!r}{f'; did you mean {close}?' if close else ''} Known keys are listed in train/config.py."
            )
        kind = hints[key]
        try:
            if kind is bool and not isinstance(value, bool):
                raise ValueError("expected true or false")
            if typing.get_origin(kind) is tuple:  # a list of paths: YAML gives a list, --set may give one string
                value = (
                    ()
                    if value in (None, "")
                    else tuple(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
                )
            elif kind in (int, float):
                if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
                    raise ValueError(f"expected {kind.__name__}")
                value = kind(float(value)) if kind is int else float(value)  # PyYAML reads 1e-4 as a string
            elif kind is str:
                value = "" if value is None else str(value)
        except (TypeError, ValueError) as error:
            wanted = "a list of paths" if typing.get_origin(kind) is tuple else getattr(kind, "__name__", str(kind))
            raise ConfigError(f"{key}: cannot use {value!r} ({error}); give {wanted} (see train/config.py).") from error
        out[key] = value
    return out


def as_flat_dict(config: Config) -> dict:
    """The config as str/int/float/bool values, for trackers (TensorBoard hparams take no lists)."""
    return {
        key: (", ".join(value) if isinstance(value, tuple) else value)
        for key, value in dataclasses.asdict(config).items()
    }
