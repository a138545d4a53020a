"""Capture of the generated tokens' final-norm states, with the official alignment (recipe section 4).

ThinkDiff-LVLM feeds FLUX the final-norm hidden states of the tokens the VLM *generates*: N generated tokens give N
vectors, vector 0 being the state of the last prompt token and vector k the state of generated token k-1 (the last
generated token's state is never computed). A forward hook on the language model's final norm records exactly those
N states: once in the prefill (its last position) and once per decode step of transformers' generate (the fast
engine stops the hook after the prefill and reports its steps' states itself). No other layer's states are kept.
"""

from __future__ import annotations

import torch

from .hf_compat import final_norm


class FinalNormCapture:
    """While entered, records the final norm's last-position state at every forward of `model`.

    states: one (batch, 1, vlm_hidden_size) tensor per forward, the prefill's first.
    prompt_states: (batch, prompt_tokens, vlm_hidden_size), the prefill's whole output, if keep_prompt_states
        (the input-token ablation); else None.
    """

    def __init__(self, model: torch.nn.Module, keep_prompt_states: bool = False) -> None:
        self.module = final_norm(model)
        self.keep_prompt_states = keep_prompt_states
        self.states: list[torch.Tensor] = []
        self.prompt_states: torch.Tensor | None = None
        self._handle = None

    def __enter__(self) -> FinalNormCapture:
        self._handle = self.module.register_forward_hook(self._record)
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        """Remove the hook (idempotent); what was recorded stays."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def clear(self) -> None:
        """Let the recorded states go (before the caller frees memory after an out-of-memory error)."""
        self.states.clear()
        self.prompt_states = None

    def _record(self, _module, _args, output: torch.Tensor) -> None:
        # The prefill sees the whole prompt, each decode step one new position; the last position is the one that
        # produced the next token.
        if self.keep_prompt_states and not self.states:
            self.prompt_states = output.detach()
        self.states.append(output[:, -1:, :].detach())
