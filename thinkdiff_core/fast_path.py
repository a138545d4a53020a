"""The fast engine's side of encode_with_vlm: transformers' prefill, then the engine's decode steps.

transformers' `generate` runs for one token (vision tower, M-RoPE positions, the prompt's KV cache, in whatever layout
its version has); the engine (fast_decode.py) decodes every further token from that cache; the result is put in the
form generate's path gives: ids padded after each row's EOS, states with the official alignment (capture.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .capture import FinalNormCapture
from .generation import GenerationSettings, generate_kwargs
from .hf_compat import cache_layers, generate_cache
from .vlm_loader import VlmBundle


def _prefill_kwargs(vlm: VlmBundle) -> dict:
    """generate() for one token: transformers does the prefill (vision, M-RoPE, KV cache); we take its raw logits."""
    kwargs = generate_kwargs(vlm, GenerationSettings(num_tokens=1, stop_at_eos=True, greedy=True), None)
    return {**kwargs, "return_dict_in_generate": True, "output_logits": True}


def prefill(vlm: VlmBundle, inputs: dict) -> tuple[torch.Tensor, list, torch.Tensor]:
    """(last prompt position's logits, per-layer prompt KV, the first generated token's RoPE position) per row.

    The position is read from what transformers itself gave the language model's rotary embedding for the prompt
    (its last position + 1: the text after a prompt continues M-RoPE from there), so it holds for every version's
    M-RoPE bookkeeping and for left-padded rows. Only the KV tensors outlive this call, not generate's output.
    """
    positions: list[torch.Tensor] = []

    def record(_module, args, kwargs):
        position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        if position_ids is not None and not positions:
            positions.append(position_ids)

    hook = vlm.fast_decoder().parts.rotary.register_forward_pre_hook(record, with_kwargs=True)
    try:
        output = vlm.model.generate(**inputs, **_prefill_kwargs(vlm))
    finally:
        hook.remove()
    batch, length = inputs["input_ids"].shape
    if positions and positions[0].numel() % (batch * length) == 0:
        first_positions = positions[0].reshape(-1, batch, length)[0, :, -1] + 1
    else:  # transformers 5's rope_deltas count real tokens: position = real length + delta
        mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
        deltas = getattr(vlm.model.model, "rope_deltas", None)
        first_positions = mask.long().sum(dim=1) + (deltas.view(-1).to(mask.device) if deltas is not None else 0)
    return output.logits[0], cache_layers(generate_cache(output)), first_positions


def decode(
    vlm: VlmBundle,
    inputs: dict,
    settings: GenerationSettings,
    choose: Callable[[torch.Tensor, int], torch.Tensor],
    capture: FinalNormCapture,
    on_token: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(generated_ids, hidden_states) for `inputs`, as generate's path gives them.

    choose(logits, k) -> (batch,) picks token k: encode_with_vlm passes the TokenChooser of `settings`.
    capture: an entered FinalNormCapture; it records the prefill (the last prompt position's state, and the prompt's
        states if asked) and is stopped after it, since the engine's steps report their states themselves.
    """
    first_logits, prompt_kv, first_positions = prefill(vlm, inputs)
    capture.stop()
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(inputs["input_ids"])
    eos_ids = torch.tensor(vlm.eos_ids() or [-1], device=mask.device)
    result = vlm.fast_decoder().decode(
        first_logits=first_logits,
        prompt_kv=prompt_kv,
        prompt_mask=mask,
        first_positions=first_positions,
        num_tokens=settings.num_tokens,
        choose=choose,
        on_token=on_token,
        is_finished=(lambda ids: torch.isin(ids, eos_ids).any(dim=1)) if settings.stop_at_eos else None,
    )
    hidden_states = torch.cat([capture.states[0], result.hidden_states], dim=1)
    generated_ids = result.generated_ids
    if settings.stop_at_eos:  # as generate: pad after a row's EOS, stop where every row has ended
        is_eos = torch.isin(generated_ids, eos_ids)
        after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
        generated_ids = generated_ids.masked_fill(after_eos, vlm.pad_id())
        if bool(is_eos.any(dim=1).all()):
            end = int((is_eos.int().argmax(dim=1) + 1).max())
            generated_ids, hidden_states = generated_ids[:, :end], hidden_states[:, :end]
    return generated_ids, hidden_states
