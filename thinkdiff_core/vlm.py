"""Encoding with the reasoning VLM: inputs, generation with either engine, and the features ThinkDiff-LVLM uses.

`encode_with_vlm` generates tokens and returns the final-norm states of the generated ones, with the official
alignment (capture.py, recipe section 4), as VlmFeatures. The prompt layouts are in prompts.py, loading in
vlm_loader.py, the generation settings in generation.py, the fast engine in fast_decode.py and fast_path.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from . import fast_path
from .capture import FinalNormCapture
from .errors import PromptError, ThinkDiffError, first_line
from .fast_decode import unsupported_reason
from .generation import GenerationSettings, TokenChooser, generate_kwargs
from .images import fit_pixel_budget
from .vlm_loader import ENGINES, VlmBundle

logger = logging.getLogger(__name__)

_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError from 2.5


@dataclass(frozen=True)
class VlmFeatures:
    """What a VLM run produced.

    hidden_states: (batch, num_tokens, vlm_hidden_size) final-norm states with the official alignment.
    generated_ids: (batch, num_tokens) generated token ids (padding after EOS when stop_at_eos ended early).
    lengths: (batch,) number of valid vectors per row (num_tokens unless generation stopped at EOS).
    prompt_ids: (batch, prompt_tokens) the prompt as the VLM saw it (left-padded in a batch).
    text: the generated text of each row, special tokens removed.
    source_model: name of the VLM folder, for checks against the aligner (model_type: its architecture, too).
    prompt_states: (batch, prompt_tokens, vlm_hidden_size) the prompt's own states, only if asked for (an ablation).
    """

    hidden_states: torch.Tensor
    generated_ids: torch.Tensor
    lengths: torch.Tensor
    prompt_ids: torch.Tensor
    text: list[str]
    source_model: str = ""
    prompt_states: torch.Tensor | None = field(default=None, repr=False)
    model_type: str = ""  # the VLM's transformers model_type ("qwen2_vl"), checked against the aligner's
    variant = "lvlm"  # class constant, not a field: which aligner variant these features feed

    @property
    def vlm_hidden_size(self) -> int:
        return self.hidden_states.shape[-1]

    @property
    def num_tokens(self) -> int:
        return self.hidden_states.shape[1]

    def to(self, device: torch.device | str) -> VlmFeatures:
        """A copy with every tensor on `device` (the encode node hands them on where ComfyUI keeps conditioning, so the VLM
        can leave the GPU)."""
        move = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return replace(
            self,
            hidden_states=move(self.hidden_states),
            generated_ids=move(self.generated_ids),
            lengths=move(self.lengths),
            prompt_ids=move(self.prompt_ids),
            prompt_states=move(self.prompt_states),
        )


class VlmOutOfMemoryError(ThinkDiffError, _OUT_OF_MEMORY):
    """The VLM ran out of GPU (or CPU) memory; the message says what to change.

    Also a torch OutOfMemoryError, so ComfyUI's executor still unloads its models after it, as for any OOM.
    """


def control_tokens(tokenizer) -> list[str]:
    """The tokenizer's own control tokens (<|im_end|>, <|im_start|>, <|image_pad|>, ...), longest first."""
    special = [token for token in getattr(tokenizer, "all_special_tokens", []) if len(token) > 2]
    special += [
        str(token)
        for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()
        if getattr(token, "special", False)
    ]
    return sorted(set(special), key=len, reverse=True)


def refuse_control_tokens(special: list[str], messages: list[dict]) -> None:
    """Text holding one of `special` (control_tokens) would end the user's turn early, open a new one, or claim a
    picture that is not there: refused, naming the token."""
    for message in messages:
        for part in message["content"]:
            text = part.get("text") if part.get("type") == "text" else None
            found = next((token for token in special if text and token in text), None)
            if found:
                raise PromptError(
                    f"the prompt holds the model's control token {found!r}, which would change the conversation's turns "
                    f"or claim a picture: remove it (pictures go in the image inputs, placed with <image>)."
                )


def prepare_inputs(vlm: VlmBundle, conversations: Sequence[list[dict]], add_vision_id: bool = False) -> dict:
    """Chat template + processor for a batch of conversations; images are fitted to the pixel budget.

    add_vision_id renders "Picture k: " before each image: the official CoBSAT inference does, the single-image
    inference and the training precompute do not (recipe section 6).
    """
    texts, images = [], []
    special = control_tokens(vlm.processor.tokenizer)  # once per batch, not per conversation
    for messages in conversations:
        refuse_control_tokens(special, messages)
        texts.append(
            vlm.processor.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, add_vision_id=add_vision_id
            )
        )
        for message in messages:
            for part in message["content"]:
                if part["type"] == "image":
                    images.append(fit_pixel_budget(part["image"], vlm.max_image_pixels))
    tokenizer = vlm.processor.tokenizer
    tokenizer.padding_side = "left"  # the hook takes the last prompt position of every row
    inputs = vlm.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    return dict(inputs)


def model_inputs(vlm: VlmBundle, conversations: Sequence[list[dict]], add_vision_id: bool = False) -> dict:
    """prepare_inputs, on the model's device, with the pixels in the vision tower's dtype: what generate is given."""
    model = vlm.model
    device = next(model.parameters()).device
    inputs = prepare_inputs(vlm, conversations, add_vision_id=add_vision_id)
    inputs = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(
            next(model.visual.parameters()).dtype if hasattr(model, "visual") else model.dtype
        )
    return inputs


def resolve_engine(vlm: VlmBundle, engine: str, device: torch.device) -> str:
    """The engine that runs: "auto" is the fast engine on CUDA where it supports the model, else transformers'."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "generate":
        return engine
    reason = unsupported_reason(vlm.model)
    if engine == "fast":
        if reason:
            raise ValueError(f"the fast engine cannot run '{vlm.source_model}': {reason}. Use engine 'generate'.")
        return engine
    if device.type == "cuda" and not reason:
        return "fast"
    if device.type == "cuda":
        logger.info("fast engine not used for %s: %s", vlm.source_model, reason)
    return "generate"


def encode_with_vlm(
    vlm: VlmBundle,
    conversations: list[dict] | Sequence[list[dict]],
    settings: GenerationSettings = GenerationSettings(),
    on_token: Callable[[int], None] | None = None,
    keep_prompt_states: bool = False,
    add_vision_id: bool = False,
    engine: str | None = None,
) -> VlmFeatures:
    """Generate and capture final-norm states of the generated tokens (the official alignment, see capture.py).

    conversations: one chat (a list of messages) or a batch of them.
    on_token(n): called after each generated token with the count so far; raising from it stops generation
        (ComfyUI's progress bar does this on Cancel).
    add_vision_id: "Picture k: " labels, for the in-context (CoBSAT) layout; see prepare_inputs.
    engine: "generate" (transformers' generate), "fast" (static cache, compiled and CUDA-graphed on GPU; see
        fast_decode.py) or "auto" (fast on CUDA where supported); None: the bundle's own (vlm.engine). Greedy tokens
        are the same either way, up to the order of floating-point sums (bf16 near-ties can break differently).
    """
    if conversations and isinstance(conversations[0], dict):
        conversations = [conversations]
    model = vlm.model
    inputs = model_inputs(vlm, conversations, add_vision_id=add_vision_id)
    device = next(model.parameters()).device
    prompt_ids = inputs["input_ids"]
    _check_context_length(model, prompt_ids.shape[1], settings.num_tokens)
    engine = resolve_engine(vlm, engine or vlm.engine, device)
    capture = FinalNormCapture(model, keep_prompt_states)
    try:
        with torch.inference_mode(), capture:
            if engine == "fast":
                choose = TokenChooser(vlm, settings, device)
                generated_ids, hidden_states = fast_path.decode(vlm, inputs, settings, choose, capture, on_token)
            else:
                generated_ids, hidden_states = _generate(vlm, inputs, settings, capture, on_token)
    except _OUT_OF_MEMORY as error:
        capture.clear()  # let the states go before the caller frees memory
        vlm.release_device_buffers()
        images = int(inputs["image_grid_thw"].shape[0]) if "image_grid_thw" in inputs else 0
        raise VlmOutOfMemoryError(
            f"out of memory while the VLM read {prompt_ids.shape[1]} prompt tokens ({images} image(s)) and generated "
            f"{settings.num_tokens} tokens on {device}. Use fewer or smaller images, fewer tokens, or free memory "
            f"first (keep_model_loaded off, other models unloaded); or load the VLM 8-bit or 4-bit (quantization on "
            f"the loader, needs bitsandbytes), or on cpu. ({first_line(error)})"
        ) from error

    return VlmFeatures(
        hidden_states=hidden_states,
        generated_ids=generated_ids,
        lengths=_valid_lengths(vlm, generated_ids, settings),
        prompt_ids=prompt_ids,
        text=vlm.processor.batch_decode(generated_ids, skip_special_tokens=True),
        source_model=vlm.source_model,
        prompt_states=capture.prompt_states,
        model_type=str(getattr(vlm.model.config, "model_type", "") or ""),
    )


def _generate(
    vlm: VlmBundle, inputs: dict, settings: GenerationSettings, capture: FinalNormCapture, on_token
) -> tuple[torch.Tensor, torch.Tensor]:
    """(generated_ids, hidden_states) through transformers' generate, seeded without touching the global RNG."""
    device = inputs["input_ids"].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if settings.seed is not None and not settings.greedy:
            torch.manual_seed(settings.seed)
        output_ids = vlm.model.generate(**inputs, **generate_kwargs(vlm, settings, on_token))
    generated_ids = output_ids[:, inputs["input_ids"].shape[1] :]
    return generated_ids, torch.cat(capture.states, dim=1)[:, : generated_ids.shape[1]]


def _check_context_length(model, prompt_tokens: int, new_tokens: int) -> None:
    config = getattr(model.config, "text_config", model.config)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and prompt_tokens + new_tokens > limit:
        raise PromptError(
            f"the prompt is {prompt_tokens} tokens (images included) and {new_tokens} more are to be generated, but "
            f"the model handles at most {limit}. Shorten the text, use fewer or smaller images, or fewer tokens."
        )


def _valid_lengths(vlm: VlmBundle, generated_ids: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    batch, total = generated_ids.shape
    if not settings.stop_at_eos:
        return torch.full((batch,), total, dtype=torch.long)
    is_eos = torch.isin(generated_ids.cpu(), torch.tensor(vlm.eos_ids() or [-1]))
    # length = position of the first EOS + 1 (the EOS vector itself is the state that produced it), else all.
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, torch.full((batch,), total))
    return first.long()
