"""Names of the floating-point dtypes the pack accepts, in one place (loader widgets, CLI flags, training configs)."""

from __future__ import annotations

import torch

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_CHOICES = ("auto", *TORCH_DTYPES)  # widgets and CLI flags: "auto" lets the device decide


def torch_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    """The dtype called `name`; "auto" is bfloat16 on a GPU and float32 on the CPU (CLI and scripts).

    The loader nodes resolve "auto" themselves (ComfyUI's preference per device), before calling this.
    """
    if name == "auto":
        return torch.bfloat16 if torch.device(device or "cpu").type == "cuda" else torch.float32
    if name not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    return TORCH_DTYPES[name]
