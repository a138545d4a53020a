"""How the VLM generates: the settings, and how each decode engine applies them.

`generate_kwargs` turns GenerationSettings into transformers' `generate` arguments; `TokenChooser` applies the same
processors, in the same order, to the fast engine's logits. Both follow the official inference (recipe section 5):
min_tokens = max_tokens, top-k off, no repetition penalty, vision placeholders never chosen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .hf_compat import import_transformers
from .vlm_loader import VlmBundle


@dataclass(frozen=True)
class GenerationSettings:
    """How the VLM generates. Defaults are the recipe's inference settings (section 5).

    num_tokens: tokens to generate; with stop_at_eos=False exactly this many (EOS is suppressed, like vLLM's
        min_tokens = max_tokens = 128 in the official inference), giving exactly num_tokens feature vectors.
    stop_at_eos: stop at the end-of-turn token instead (the training-feature precompute; then fewer may come back).
    greedy: argmax decoding instead of sampling (deterministic; useful for tests and comparisons).
    temperature, top_p: sampling parameters; top-k is always off, as in vLLM.
    seed: sampling seed (None: not seeded). Seeding does not disturb the global RNG.
    """

    num_tokens: int = 128
    stop_at_eos: bool = False
    greedy: bool = False
    temperature: float = 0.6
    top_p: float = 0.9
    seed: int | None = 42

    def __post_init__(self) -> None:
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise ValueError(f"num_tokens must be a whole number of at least 1, got {self.num_tokens!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64
        ):
            raise ValueError(f"seed must be a whole number from 0 to 2**64 - 1 (ComfyUI's range), got {self.seed!r}")
        if not self.greedy and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")


def generate_kwargs(vlm: VlmBundle, settings: GenerationSettings, on_token) -> dict:
    transformers = import_transformers()
    eos_ids = vlm.eos_ids()
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.num_tokens,
        # EOS suppressed until num_tokens: the official inference's min_tokens = max_tokens (recipe section 5).
        "min_new_tokens": 1 if settings.stop_at_eos else settings.num_tokens,
        "eos_token_id": eos_ids or None,
        "pad_token_id": vlm.pad_id(),
        # vLLM applies no repetition penalty; Qwen2-VL's generation_config.json asks for 1.05, and generate() would
        # fill it in from there (recipe section 5: only SamplingParams count).
        "repetition_penalty": 1.0,
    }
    # Vision placeholders are never a valid answer; a real VLM gives them ~0 probability, tiny random ones do not,
    # and a generated <|image_pad|> would break any later forward pass over the sequence.
    if vision_tokens := vlm.vision_token_ids():
        kwargs["suppress_tokens"] = vision_tokens
    if settings.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    if on_token is not None:
        kwargs["stopping_criteria"] = transformers.StoppingCriteriaList([TokenCallback(on_token)])
    return kwargs


class TokenCallback:
    """A stopping criterion that never stops by itself: it reports each token, and its callback may raise."""

    def __init__(self, on_token: Callable[[int], None]) -> None:
        self.on_token = on_token
        self.count = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.count += 1
        self.on_token(self.count)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class TokenChooser:
    """The fast engine's token choice, with generate's processors in generate's order: suppressed vision tokens,
    EOS held back until the minimum length, then argmax, or temperature + top-p (HF's TopPLogitsWarper rule) and a
    draw from a private generator seeded by settings.seed (the global RNG is not touched)."""

    def __init__(self, vlm: VlmBundle, settings: GenerationSettings, device: torch.device) -> None:
        self.settings = settings
        self.min_tokens = 1 if settings.stop_at_eos else settings.num_tokens
        self.suppress = torch.tensor(vlm.vision_token_ids(), dtype=torch.long, device=device)
        self.eos = torch.tensor(vlm.eos_ids(), dtype=torch.long, device=device)
        self.generator = None
        if not settings.greedy:
            self.generator = torch.Generator(device=device)
            if settings.seed is not None:
                self.generator.manual_seed(settings.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor, index: int) -> torch.Tensor:
        logits = logits.float().clone()
        if self.suppress.numel():
            logits.index_fill_(1, self.suppress, -math.inf)
        if index < self.min_tokens and self.eos.numel():
            logits.index_fill_(1, self.eos, -math.inf)
        if self.settings.greedy:
            return logits.argmax(dim=-1)
        logits = logits / self.settings.temperature
        if self.settings.top_p < 1.0:
            sorted_logits, sorted_indices = torch.sort(logits, descending=False)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= (1 - self.settings.top_p)
            remove[..., -1:] = False  # keep at least one token
            logits = logits.masked_fill(remove.scatter(1, sorted_indices, remove), -math.inf)
        probs = logits.softmax(dim=-1)
        race = torch.empty_like(probs).exponential_(generator=self.generator).clamp_min_(torch.finfo(probs.dtype).tiny)
        return (probs / race).argmax(dim=-1)
