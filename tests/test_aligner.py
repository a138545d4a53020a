"""The aligner against an independent recomputation of the official projector."""

import math

import pytest
import torch
from torch import nn

from thinkdiff_core import AlignerSpec, ThinkDiffAligner, init_norm_from_t5


def reference_projector(aligner: ThinkDiffAligner, x: torch.Tensor) -> torch.Tensor:
    """The official mlp2x_gelu_t5_norm written out by hand: Linear, erf GELU, Linear, T5 RMSNorm (eps 1e-6)."""
    h = x @ aligner.linear_in.weight.T + aligner.linear_in.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    h = h @ aligner.linear_out.weight.T + aligner.linear_out.bias
    return aligner.norm.weight * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_forward_matches_hand_written_projector():
    torch.manual_seed(0)
    aligner = ThinkDiffAligner(AlignerSpec("lvlm", input_dim=37, output_dim=48))
    with torch.no_grad():
        aligner.norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(2, 5, 37)
    torch.testing.assert_close(aligner(x), reference_projector(aligner, x))
    assert aligner(x).shape == (2, 5, 48)


def test_layer_shapes_match_official_for_qwen2vl_7b():
    aligner = ThinkDiffAligner(AlignerSpec("lvlm", input_dim=3584))
    assert aligner.linear_in.weight.shape == (4096, 3584)
    assert aligner.linear_out.weight.shape == (4096, 4096)
    assert aligner.norm.weight.shape == (4096,)
    assert isinstance(aligner.act, nn.GELU) and aligner.act.approximate == "none"
    # about 31.47 M parameters (recipe section 2)
    assert sum(p.numel() for p in aligner.parameters()) == 3584 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096


def test_init_norm_from_t5_copies_encoder_final_norm():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=50, d_model=48, d_ff=37, d_kv=8, num_layers=1, num_heads=2, decoder_start_token_id=0)
    )
    with torch.no_grad():
        t5.encoder.final_layer_norm.weight.uniform_(0.1, 3.0)
    aligner = ThinkDiffAligner(AlignerSpec("lvlm", input_dim=16, output_dim=48))
    init_norm_from_t5(aligner, t5.encoder.final_layer_norm.weight)
    torch.testing.assert_close(aligner.norm.weight, t5.encoder.final_layer_norm.weight)
    assert aligner.norm.weight.data_ptr() != t5.encoder.final_layer_norm.weight.data_ptr()  # a copy, not shared


def test_init_norm_refuses_other_width():
    aligner = ThinkDiffAligner(AlignerSpec("lvlm", input_dim=16, output_dim=48))
    with pytest.raises(ValueError, match="output_dim must equal the T5 d_model"):
        init_norm_from_t5(aligner, torch.ones(64))


def test_norm_keeps_half_precision_stable():
    aligner = ThinkDiffAligner(AlignerSpec("clip", input_dim=8, output_dim=16)).to(torch.bfloat16)
    out = aligner(torch.full((1, 3, 8), 300.0, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_spec_rejects_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        AlignerSpec("sdxl", input_dim=8)
