"""The ThinkDiff aligner: VLM or vision-encoder features -> T5-XXL encoder space.

Matches the official `mlp2x_gelu_t5_norm` projector (recipe section 2):

    Linear(input_dim -> output_dim, bias) -> exact GELU -> Linear(output_dim -> output_dim, bias) -> T5 RMSNorm

with output_dim = 4096 (T5-XXL d_model) for every released aligner. The norm is what keeps training stable
(paper Fig. 7); `init_norm_from_t5` copies the frozen T5 encoder's final norm into it, as the official code does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

VARIANTS = ("lvlm", "clip")
T5_XXL_WIDTH = 4096


@dataclass(frozen=True)
class AlignerSpec:
    """Everything needed to rebuild an aligner and to check it against its features.

    variant: "lvlm" (generated-token states of a VLM) or "clip" (vision-encoder image tokens).
    input_dim: feature width (3584 for Qwen2-VL-7B, 1408 for BLIP-2's EVA ViT-g).
    output_dim: T5 encoder width the aligner maps into (4096 for T5-XXL, which FLUX.1 uses).
    source_model: the VLM or vision encoder the aligner was trained on, for messages and metadata.
    num_tokens: how many VLM tokens to generate at inference by default (128 in the recipe).
    vlm_model_type: the transformers model_type of the VLM it was trained on ("qwen2_vl"; "" when unknown): features
        of another architecture of the same width (Qwen2.5-VL-7B is also 3584 wide) are refused.
    """

    variant: str
    input_dim: int
    output_dim: int = T5_XXL_WIDTH
    source_model: str = ""
    num_tokens: int = 128
    vlm_model_type: str = ""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.input_dim <= 0 or self.output_dim <= 0:
            raise ValueError(f"dims must be positive, got input {self.input_dim}, output {self.output_dim}")

    def to_dict(self) -> dict:
        return asdict(self)


class T5RMSNorm(nn.Module):
    """T5-style RMS norm: scale only, no mean subtraction, no bias.

    The variance is computed in fp32 so that bf16/fp16 inputs do not overflow, as in transformers' T5LayerNorm.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class ThinkDiffAligner(nn.Module):
    """Maps features (..., input_dim) to T5-space tokens (..., output_dim).

    State-dict keys (`linear_in`, `linear_out`, `norm`) are this project's file contract; the official
    `mm_projector.{0,2,3}` names are translated in `checkpoints.py` only.
    """

    def __init__(self, spec: AlignerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.linear_in = nn.Linear(spec.input_dim, spec.output_dim)
        self.act = nn.GELU(approximate="none")  # exact erf GELU, as the official projector
        self.linear_out = nn.Linear(spec.output_dim, spec.output_dim)
        self.norm = T5RMSNorm(spec.output_dim, eps=1e-6)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (..., input_dim) -> (..., output_dim)."""
        return self.norm(self.linear_out(self.act(self.linear_in(features))))


def init_norm_from_t5(aligner: ThinkDiffAligner, t5_final_norm_weight: torch.Tensor) -> None:
    """Copy a T5 encoder's final layer norm weight into the aligner's norm (recipe section 2).

    Pass `t5_model.encoder.final_layer_norm.weight` of the frozen (flan-)T5 whose space the aligner targets.
    """
    weight = t5_final_norm_weight.detach()
    if weight.shape != aligner.norm.weight.shape:
        raise ValueError(
            f"T5 final norm has shape {tuple(weight.shape)}, the aligner norm {tuple(aligner.norm.weight.shape)}: "
            f"the aligner's output_dim must equal the T5 d_model"
        )
    with torch.no_grad():
        aligner.norm.weight.copy_(weight.to(aligner.norm.weight.dtype))
