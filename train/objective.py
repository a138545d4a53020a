"""The frozen side of the proxy task and its loss (recipe sections 1 and 8): flan-T5's decoder cross-attends to the
aligned tokens and is scored on the target tokens; only the aligner gets gradients.

Speed (train/README.md, "Speed"): only the decoder states at real target tokens go through T5's 32128-wide output
layer (same loss as T5's own), masks are passed in the 4D form that needs no host synchronisation, and with
`compile: true` each frozen block is compiled on its own (one graph serves all blocks after the first).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from thinkdiff_core.errors import ModelFolderError, first_line
from thinkdiff_core.hf_compat import dtype_kwargs, t5_attention_mask
from thinkdiff_core.vision import encode_images
from thinkdiff_train.config import Config
from thinkdiff_train.tasks import IGNORE_INDEX


def load_frozen_t5(path: str, dtype: torch.dtype):
    """flan-T5 from a local folder (never downloaded), frozen, in eval mode; and its tokenizer."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    if not path or not (Path(path) / "config.json").is_file():
        raise ModelFolderError(
            f"t5_path '{path}' is not a model folder with config.json. Set it to a local copy of google/flan-t5-xxl."
        )
    from safetensors import SafetensorError

    from thinkdiff_core.vlm_loader import check_loading_info

    try:
        model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError, OSError) as error:
        raise ModelFolderError(
            f"'{path}/config.json' is not a readable JSON config ({error}); download it again."
        ) from error
    if model_type != "t5":
        raise ModelFolderError(
            f"t5_path '{path}' holds a '{model_type}' model, not T5. Set t5_path to a local copy of google/flan-t5-xxl."
        )
    try:
        t5, info = T5ForConditionalGeneration.from_pretrained(
            path, local_files_only=True, output_loading_info=True, **dtype_kwargs(dtype)
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as error:
        raise ModelFolderError(
            f"t5_path '{path}' could not be loaded as flan-T5 ({first_line(error)}): weights or tokenizer "
            f"files are missing, truncated or of another model. Download google/flan-t5-xxl again into that folder."
        ) from error
    check_loading_info(info, Path(path), "a T5 model")
    return t5.eval().requires_grad_(False), tokenizer


class TargetCrossEntropy(torch.nn.Module):
    """T5's output layer and cross-entropy for the real target tokens only: (tokens, d_model) decoder states and
    (tokens,) ids -> summed loss (fp32). Padding never reaches the 32128-wide output layer."""

    def __init__(self, t5) -> None:
        super().__init__()
        self.lm_head = t5.lm_head
        # Original T5 scales the decoder output before its tied output layer, flan-T5 (T5 v1.1) does not; transformers
        # 5 calls the switch scale_decoder_outputs, earlier versions read it from tie_word_embeddings.
        config = t5.config
        self.scale = (
            config.d_model**-0.5 if getattr(config, "scale_decoder_outputs", config.tie_word_embeddings) else 1.0
        )

    def forward(self, states: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(states * self.scale if self.scale != 1.0 else states)
        return F.cross_entropy(logits.float(), target_ids, reduction="sum")


@dataclass
class FrozenModels:
    """The frozen side of the proxy task: flan-T5 (its decoder; for CLIP also its encoder), the output-layer loss and,
    for CLIP, BLIP-2's vision tower with its token downsampling."""

    t5: torch.nn.Module
    target_loss: TargetCrossEntropy
    vision: torch.nn.Module | None = None
    downsample_factor: int = 2


def compile_frozen_models(frozen: FrozenModels, backend: str = "inductor") -> None:
    """torch.compile each T5 block and the output-layer loss, with dynamic shapes (regional compilation).

    One graph serves every block after the first, so the first step compiles two blocks, not the model; dynamic
    shapes let every bucket length (a multiple of pad_to_multiple) reuse the same graphs instead of compiling one per
    shape. Weights stay as loaded: bf16 on the GPU, never cast per step.
    """
    # All compiled modules share nn.Module's call, hence one graph cache: block 0 (it computes the position bias) and
    # the other blocks, the loss, each with and without grad (validation), the encoder's for CLIP. That is more than
    # torch's default limit of 8, past which it would silently run eager.
    dynamo_config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 64))
    # "Duck sizing" gives dims of equal size one symbol: a first batch with as many prefix as target tokens would tie
    # the two, and the next batch would compile every block again.
    shape_config = importlib.import_module("torch.fx.experimental._config")
    if hasattr(shape_config, "use_duck_shape"):
        shape_config.use_duck_shape = False
    for stack in (frozen.t5.encoder, frozen.t5.decoder):
        for block in stack.block if stack is not None else []:
            block.compile(backend=backend, dynamic=True)
    frozen.target_loss.compile(backend=backend, dynamic=True)


def token_losses(aligner, frozen: FrozenModels, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of target-token cross-entropies, number of target tokens) of the frozen T5 decoder for one batch.

    The decoder cross-attends to the aligned tokens as its encoder output (no T5 text encoder for the LVLM variant;
    for CLIP the T5-encoded caption part 1 follows the aligned image tokens). Its states at the real target positions
    only go through the output layer: the same loss as T5's own over the padded batch, without the padding's work.
    """
    t5 = frozen.t5
    if "features" in batch:
        aligned, mask = aligner(batch["features"]), batch["feature_mask"]  # (B, s, d_model)
    else:
        with torch.no_grad():
            # (B, 65, width)
            image_tokens = encode_images(frozen.vision, batch["pixel_values"], frozen.downsample_factor)
            text_states = t5.encoder(
                input_ids=batch["prompt_ids"], attention_mask=t5_attention_mask(batch["prompt_mask"], t5.dtype)
            ).last_hidden_state
        aligned_images = aligner(image_tokens.float())
        aligned = torch.cat(
            [aligned_images, text_states.to(aligned_images.dtype)], dim=1
        )  # images first (recipe section 7)
        image_mask = torch.ones(aligned_images.shape[:2], dtype=torch.long, device=aligned_images.device)
        mask = torch.cat([image_mask, batch["prompt_mask"]], dim=1)
    labels, positions = batch["labels"], batch["target_positions"]
    states = t5.decoder(
        input_ids=t5.prepare_decoder_input_ids_from_labels(labels=labels),
        encoder_hidden_states=aligned.to(t5.dtype),
        encoder_attention_mask=t5_attention_mask(mask, t5.dtype),
        use_cache=False,
    ).last_hidden_state  # (B, T, d_model)
    loss_sum = frozen.target_loss(
        states.flatten(0, 1).index_select(0, positions), labels.flatten().index_select(0, positions)
    )
    return loss_sum, (labels != IGNORE_INDEX).sum()


def prepare_frozen_models(t5, vision, config: Config, device: torch.device) -> FrozenModels:
    """The frozen models on the training device, as the loss uses them. Call after the aligner has copied the T5
    encoder's final norm: the LVLM variant then drops the encoder (the official code deletes it too)."""
    if config.variant == "lvlm":
        t5.encoder = None
    frozen = FrozenModels(t5.to(device), TargetCrossEntropy(t5), vision, config.vision_downsample_factor)
    if config.compile:
        compile_frozen_models(frozen, config.compile_backend)
    return frozen


def token_budget(config: Config) -> int:
    """The fixed divisor of a micro-batch's summed loss under length bucketing: batch_size x the most target tokens an
    item can have. Batches of similar lengths would give short targets' tokens more weight under a per-batch mean;
    a fixed divisor weighs every target token the same whatever the batch holds (AdamW does not see the constant)."""
    return config.batch_size * (config.clip_text_tokens if config.variant == "clip" else config.max_target_tokens)
