"""transformers, across versions: the lazy import, renamed arguments, model classes and layouts (the VLM; T5's).

What the library needs to know about how a transformers version names or lays out the VLM (its classes, its final
norm, the cache generate returns) is here, so a new version is handled in one file. One version fact stays where it
is used because it is part of a computation: the M-RoPE position bookkeeping read in fast_path.prefill. The frozen T5
of training and its bench take their mask form and attention from here. transformers is imported lazily (`import
thinkdiff_core` works without it), and a missing class names the version needed.
"""

from __future__ import annotations

import torch

from .errors import MissingDependencyError

# The lowest transformers the pack declares (requirements.txt and pyproject.toml say the same; a test checks) and the
# one CI's first leg runs the whole suite on. The facts below about older versions stay for readers of older installs.
TRANSFORMERS_FLOOR = "4.57.6"
MIN_TRANSFORMERS_FOR = {"qwen2_vl": "4.45.0", "qwen2_5_vl": "4.49.0"}


def import_transformers():
    try:
        import transformers
    except ImportError as error:
        raise MissingDependencyError(
            f"the VLM needs the 'transformers' package: pip install 'transformers>={TRANSFORMERS_FLOOR}'"
        ) from error
    return transformers


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """`from_pretrained` keyword for the weights' dtype: `dtype` from transformers 4.56, `torch_dtype` before."""
    transformers = import_transformers()
    return {"dtype" if transformers_at_least(transformers, "4.56.0") else "torch_dtype": dtype}


def transformers_at_least(transformers, version: str) -> bool:
    from packaging.version import Version

    return Version(transformers.__version__.split("+")[0]) >= Version(version)


def model_class(transformers, model_type: str):
    """The transformers class for a VLM config's model_type (Qwen2-VL, Qwen2.5-VL, else the image-text auto class)."""
    names = {
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    }
    name = names.get(model_type, "AutoModelForImageTextToText")
    found = getattr(transformers, name, None)
    if found is None:
        from packaging.version import Version

        needed = max(MIN_TRANSFORMERS_FOR.get(model_type, "4.50.0"), TRANSFORMERS_FLOOR, key=Version)
        raise MissingDependencyError(
            f"transformers {transformers.__version__} has no {name} (model type '{model_type}'). "
            f"Install transformers >= {needed}: pip install -U 'transformers>={needed}'"
        )
    return found


def final_norm(model) -> torch.nn.Module:
    """The language model's final norm, whose output is the state ThinkDiff uses."""
    for getter in (
        lambda m: m.model.language_model.norm,  # transformers 5 (and 4.5x) Qwen2-VL layout
        lambda m: m.model.norm,  # transformers 4.4x Qwen2-VL layout
        lambda m: m.language_model.model.norm,
        lambda m: m.get_decoder().norm,
    ):
        try:
            module = getter(model)
        except AttributeError:
            continue
        if isinstance(module, torch.nn.Module):
            return module
    raise MissingDependencyError(
        f"cannot find the final norm of {type(model).__name__}; this model type is not supported yet."
    )


def generate_cache(output):
    """The KV cache of a `generate(return_dict_in_generate=True)` output: `cache` from transformers 5.2x, before
    that `past_key_values`."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of a transformers cache, each (B, KVH, L, D)."""
    if hasattr(cache, "layers") and cache.layers and hasattr(cache.layers[0], "keys"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(keys, values) for keys, values in cache]  # legacy tuple of tuples


# --- T5 (the training recipe's frozen proxy decoder and the training bench) ------------------------------------------


def t5_attention_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (B, S) padding mask in the form this transformers' T5 takes without a host synchronisation.

    transformers 5 uses a (B, 1, 1, S) additive mask as given (from a 2D one it first asks the GPU `mask.all()` in
    Python on every call); 4.x converts a 2D 0/1 mask on the device itself and fails on a 4D additive one
    (`invert_attention_mask` knows 2D and 3D masks only)."""
    if not transformers_at_least(import_transformers(), "5.0.0"):
        return mask
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def t5_attn_implementation() -> str:
    """The fastest attention T5 has: SDPA from transformers 5, eager before (4.x's T5 refuses 'sdpa')."""
    return "sdpa" if transformers_at_least(import_transformers(), "5.0.0") else "eager"


def t5_empty_encoder_layers() -> int:
    """`num_layers` for a T5 whose encoder is dropped once built (the LVLM variant's frozen decoder): 0 from
    transformers 5; 4.x refuses a stack without layers (its `_keep_in_fp32_modules` check finds no 'wo'), so 1 there."""
    return 0 if transformers_at_least(import_transformers(), "5.0.0") else 1
