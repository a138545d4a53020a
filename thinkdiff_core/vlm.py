"""The reasoning VLM: prompt layout, generation, and capture of the generated tokens' final-norm states.

ThinkDiff-LVLM feeds FLUX the final-norm hidden states of the tokens the VLM *generates* (recipe section 4), with
the official alignment: N generated tokens give N vectors, vector 0 being the state of the last prompt token and
vector k the state of generated token k-1 (the last generated token's state is never computed). A forward hook on
the language model's final norm records exactly those N states during `generate`: once in the prefill (its last
position) and once per decode step. No other layer's states are kept.

transformers is imported lazily, so `import thinkdiff_core` works without it; a missing class names the version needed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import MissingDependencyError, ModelFolderError, PromptError, ThinkDiffError
from .fast_decode import FastDecodeOptions, FastDecoder, cache_layers, unsupported_reason

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_MARKER = "<image>"
# CoBSAT question used by the official interleaved inference (recipe section 6), quoted verbatim.
COBSAT_QUESTION = (
    "I give you several words and pictures. First, please analyse what the next picture is. Then give me a detailed "
    "diffusion prompt to describe the next picture. Please only provide me the detailed prompt and start the answer "
    "with 'Create an image'."
)
# Images larger than this are scaled down (aspect kept) before the processor sees them: Qwen2-VL's own limit is
# 12.8 MP, whose vision tokens would not fit most GPUs. 1280 * 28 * 28 pixels is about 1280 vision tokens.
DEFAULT_MAX_IMAGE_PIXELS = 1280 * 28 * 28
MIN_TRANSFORMERS_FOR = {"qwen2_vl": "4.45.0", "qwen2_5_vl": "4.49.0"}
ATTENTION_BACKENDS = ("sdpa", "flash_attention_2", "eager")
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError from 2.5


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
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1, got {self.num_tokens}")
        if not self.greedy and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")


@dataclass(frozen=True)
class VlmFeatures:
    """What a VLM run produced.

    hidden_states: (batch, num_tokens, vlm_hidden_size) final-norm states with the official alignment.
    generated_ids: (batch, num_tokens) generated token ids (padding after EOS when stop_at_eos ended early).
    lengths: (batch,) number of valid vectors per row (num_tokens unless generation stopped at EOS).
    prompt_ids: (batch, prompt_tokens) the prompt as the VLM saw it (left-padded in a batch).
    text: the generated text of each row, special tokens removed.
    source_model: name of the VLM folder, for checks against the aligner.
    prompt_states: (batch, prompt_tokens, vlm_hidden_size) the prompt's own states, only if asked for (an ablation).
    """

    hidden_states: torch.Tensor
    generated_ids: torch.Tensor
    lengths: torch.Tensor
    prompt_ids: torch.Tensor
    text: list[str]
    source_model: str = ""
    prompt_states: torch.Tensor | None = field(default=None, repr=False)
    variant = "lvlm"  # class constant, not a field: which aligner variant these features feed

    @property
    def vlm_hidden_size(self) -> int:
        return self.hidden_states.shape[-1]

    @property
    def num_tokens(self) -> int:
        return self.hidden_states.shape[1]

    def to(self, device: torch.device | str) -> VlmFeatures:
        """A copy with every tensor on `device` (the encode node hands CPU features on, so the VLM can leave the GPU)."""
        move = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return replace(
            self,
            hidden_states=move(self.hidden_states),
            generated_ids=move(self.generated_ids),
            lengths=move(self.lengths),
            prompt_ids=move(self.prompt_ids),
            prompt_states=move(self.prompt_states),
        )


@dataclass
class VlmBundle:
    """A loaded VLM: the transformers model, its processor and where it came from."""

    model: Any
    processor: Any
    source_model: str
    path: Path | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    engine: str = "auto"  # the default decode engine of encode_with_vlm
    fast_options: FastDecodeOptions = field(default_factory=FastDecodeOptions)
    _fast: FastDecoder | None = field(default=None, init=False, repr=False)

    @property
    def hidden_size(self) -> int:
        return final_norm(self.model).weight.shape[0]

    def fast_decoder(self) -> FastDecoder:
        """The fast engine for this model, made once: its compiled code and CUDA graphs are reused across calls."""
        if self._fast is None or self._fast.model is not self.model:
            self._fast = FastDecoder(self.model, self.fast_options)
        return self._fast

    def release_device_buffers(self) -> None:
        """Give back what the fast engine holds on the device (KV caches, graphs); the model itself is untouched."""
        if self._fast is not None:
            self._fast.release()


class VlmOutOfMemoryError(ThinkDiffError, _OUT_OF_MEMORY):
    """The VLM ran out of GPU (or CPU) memory; the message says what to change.

    Also a torch OutOfMemoryError, so ComfyUI's executor still unloads its models after it, as for any OOM.
    """


# --- prompt layout -----------------------------------------------------------------------------------------------


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def image_part(image: Image.Image) -> dict:
    return {"type": "image", "image": image}


def cobsat_content(words: Sequence[str], images: Sequence[Image.Image], question: str = COBSAT_QUESTION) -> list[dict]:
    """In-context layout of the official CoBSAT inference (recipe section 6).

    words[k] labels images[k]; the last word is the query and has no image, so len(words) == len(images) + 1.
    Renders: question, "\\n\\n", "Word 1: {w1}, " [image 1], "\\n\\nWord 2: {w2}, " [image 2], ..., "\\n\\nWord n+1: {q}, ".
    """
    words = [word.strip() for word in words]
    if len(words) != len(images) + 1 or any(not word for word in words):
        raise PromptError(
            f"the in-context layout needs one word per image plus a final query word, got {len(words)} non-empty "
            f"word(s) for {len(images)} image(s). Write one word per line (e.g. 'red', 'blue', 'green') and connect "
            f"one image for each word except the last."
        )
    content = [text_part(question + "\n\n")]
    for index, (word, image) in enumerate(zip(words, images), start=1):
        prefix = "" if index == 1 else "\n\n"
        content += [text_part(f"{prefix}Word {index}: {word}, "), image_part(image)]
    content.append(text_part(f"\n\nWord {len(words)}: {words[-1]}, "))
    return content


def interleaved_content(text: str, images: Sequence[Image.Image], marker: str = IMAGE_MARKER) -> list[dict]:
    """Free layout: each `marker` in `text` is replaced by the next image, in order.

    Without any marker the images come first and the text after them, the recipe's single-image layout
    (user content = [image, instruction]).
    """
    pieces = text.split(marker)
    if len(pieces) == 1:
        content = [image_part(image) for image in images]
        if text.strip():
            content.append(text_part(text))
        elif not images:
            raise PromptError("the prompt is empty: write an instruction, connect at least one image, or both.")
        return content
    if len(pieces) - 1 != len(images):
        raise PromptError(
            f"the text has {len(pieces) - 1} '{marker}' marker(s) but {len(images)} image(s) are connected. "
            f"Use one marker per image (they are filled in order image_1, image_2, ...), or no marker at all to put "
            f"every image before the text."
        )
    content = []
    for index, piece in enumerate(pieces):
        if piece:
            content.append(text_part(piece))
        if index < len(images):
            content.append(image_part(images[index]))
    return content


def chat_messages(content: list[dict], system: str = SYSTEM_PROMPT) -> list[dict]:
    """Qwen2-VL chat messages: the recipe's system message and one user turn."""
    return [{"role": "system", "content": [text_part(system)]}, {"role": "user", "content": content}]


def fit_pixel_budget(image: Image.Image, max_pixels: int) -> Image.Image:
    """RGB copy of `image`, scaled down (aspect kept) so that width * height <= max_pixels.

    16-bit and 32-bit greyscale images (PNG modes I;16 and I) are scaled to 8 bits first: PIL's own conversion clips them.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray((array / peak * 255).clip(0, 255).astype(np.uint8), mode="L")
    image = image.convert("RGB")
    pixels = image.width * image.height
    if pixels <= max_pixels:
        return image
    scale = (max_pixels / pixels) ** 0.5
    size = (max(28, int(image.width * scale)), max(28, int(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


# --- loading -----------------------------------------------------------------------------------------------------


def load_vlm(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    quantization: str = "none",
    engine: str = "auto",
) -> VlmBundle:
    """Load a Hugging Face format VLM folder (config.json, weights, processor files). Never downloads.

    The attention backend falls back from flash_attention_2 to sdpa to eager when one is not available.
    quantization: "8-bit" or "4-bit" (NF4) loads the weights through bitsandbytes, straight onto a CUDA `device`, for
        12-16 GB cards; such weights cannot move between devices afterwards, and they decode with generate.
    engine: the bundle's default decode engine (see encode_with_vlm).
    """
    path = check_model_folder(path)
    _refuse_remote_code(path, trust_remote_code)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    transformers = import_transformers()
    quantized = _quantization_kwargs(transformers, quantization, dtype, torch.device(device))
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    model_class = _model_class(transformers, config.model_type)
    backends = ATTENTION_BACKENDS[ATTENTION_BACKENDS.index(attn_implementation) :] if attn_implementation in ATTENTION_BACKENDS else (attn_implementation, "sdpa", "eager")
    last_error: Exception | None = None
    for backend in dict.fromkeys(backends):
        try:
            model = model_class.from_pretrained(
                path,
                local_files_only=True,
                trust_remote_code=trust_remote_code,
                attn_implementation=backend,
                **dtype_kwargs(dtype),
                **quantized,
            )
            break
        except (ImportError, ValueError) as error:
            if not _is_attention_error(error):
                raise
            logger.warning("attention backend %s is not available (%s); trying the next one", backend, error)
            last_error = error
    else:
        raise MissingDependencyError(f"no attention backend of {backends} could load '{path.name}': {last_error}")
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    if not quantized:  # bitsandbytes weights are placed by device_map and cannot be moved
        model.to(device)
    model.eval().requires_grad_(False)
    return VlmBundle(
        model=model,
        processor=processor,
        source_model=path.name,
        path=path,
        max_image_pixels=max_image_pixels,
        engine=engine,
    )


QUANTIZATIONS = ("none", "8-bit", "4-bit")


def _quantization_kwargs(transformers, quantization: str, dtype: torch.dtype, device: torch.device) -> dict:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "none":
        return {}
    if device.type != "cuda":
        raise ThinkDiffError(
            f"{quantization} loading runs on a CUDA GPU only (bitsandbytes), but the VLM is to load on {device}. "
            "Choose quantization 'none' for a cpu load, or load on a cuda device."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise MissingDependencyError(
            f"{quantization} loading needs the bitsandbytes package: pip install bitsandbytes "
            "(in ComfyUI's Python), then restart. Or choose quantization 'none'."
        ) from error
    if quantization == "8-bit":
        config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return {"quantization_config": config, "device_map": {"": str(device)}}


def check_model_folder(path: str | Path) -> Path:
    """Raise ModelFolderError unless `path` is a folder with a config.json and weights."""
    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(
            f"VLM folder '{path}' does not exist. Put the Hugging Face model folder (e.g. Qwen2-VL-7B-Instruct, "
            f"with config.json and *.safetensors) under models/LLM/."
        )
    if not (path / "config.json").is_file():
        raise ModelFolderError(f"'{path}' has no config.json: it is not a complete Hugging Face model folder. Download the whole repository.")
    weights = [*path.glob("*.safetensors"), *path.glob("*.bin"), *path.glob("*.safetensors.index.json")]
    if not weights:
        raise ModelFolderError(f"'{path}' has a config.json but no weights (*.safetensors). The download is incomplete: fetch the weight files too.")
    return path


def _refuse_remote_code(path: Path, trust_remote_code: bool) -> None:
    """A folder whose config maps classes to its own .py files would run that code: only with explicit consent."""
    import json

    config = json.loads((path / "config.json").read_text())
    if config.get("auto_map") and not trust_remote_code:
        raise ModelFolderError(
            f"'{path.name}' ships its own Python code (auto_map in config.json: {sorted(config['auto_map'])}); it was "
            f"not run. Qwen2-VL needs no custom code: use the official folder, or switch trust_remote_code on in the "
            f"loader only if you trust where this folder came from."
        )


def _is_attention_error(error: Exception) -> bool:
    text = str(error).lower()
    return any(word in text for word in ("attn", "attention", "flash", "sdpa"))


def import_transformers():
    try:
        import transformers
    except ImportError as error:
        raise MissingDependencyError("the VLM needs the 'transformers' package: pip install 'transformers>=4.45'") from error
    return transformers


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """`from_pretrained` keyword for the weights' dtype: `dtype` from transformers 4.56, `torch_dtype` before."""
    transformers = import_transformers()
    return {"dtype" if _transformers_at_least(transformers, "4.56.0") else "torch_dtype": dtype}


def _transformers_at_least(transformers, version: str) -> bool:
    from packaging.version import Version

    return Version(transformers.__version__.split("+")[0]) >= Version(version)


def _model_class(transformers, model_type: str):
    names = {
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    }
    name = names.get(model_type, "AutoModelForImageTextToText")
    model_class = getattr(transformers, name, None)
    if model_class is None:
        needed = MIN_TRANSFORMERS_FOR.get(model_type, "4.50.0")
        raise MissingDependencyError(
            f"transformers {transformers.__version__} has no {name} (model type '{model_type}'). "
            f"Install transformers >= {needed}: pip install -U 'transformers>={needed}'"
        )
    return model_class


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
    raise MissingDependencyError(f"cannot find the final norm of {type(model).__name__}; this model type is not supported yet.")


# --- encoding ----------------------------------------------------------------------------------------------------


def prepare_inputs(vlm: VlmBundle, conversations: Sequence[list[dict]], add_vision_id: bool = False) -> dict:
    """Chat template + processor for a batch of conversations; images are fitted to the pixel budget.

    add_vision_id renders "Picture k: " before each image: the official CoBSAT inference does, the single-image
    inference and the training precompute do not (recipe section 6).
    """
    texts, images = [], []
    for messages in conversations:
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
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.visual.parameters()).dtype if hasattr(model, "visual") else model.dtype)
    return inputs


ENGINES = ("auto", "fast", "generate")


def resolve_engine(vlm: VlmBundle, engine: str, device: torch.device) -> str:
    """"auto": the fast engine on CUDA where it supports the model, else transformers' generate."""
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
    choose: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> VlmFeatures:
    """Generate and capture final-norm states of the generated tokens (official alignment, see module docstring).

    conversations: one chat (a list of messages) or a batch of them.
    on_token(n): called after each generated token with the count so far; raising from it stops generation
        (ComfyUI's progress bar does this on Cancel).
    add_vision_id: "Picture k: " labels, for the in-context (CoBSAT) layout; see prepare_inputs.
    engine: "generate" (transformers' generate), "fast" (static cache, compiled and CUDA-graphed on GPU; see
        fast_decode.py) or "auto" (fast on CUDA where supported); None: the bundle's own (vlm.engine). Greedy tokens
        are the same either way, up to the order of floating-point sums (bf16 near-ties can break differently).
    choose: fast engine only, for comparisons: picks token k from the (rows, vocab) logits instead of the settings'
        sampler, e.g. a ForcedChoice that replays another engine's tokens (teacher forcing).
    """
    if conversations and isinstance(conversations[0], dict):
        conversations = [conversations]
    model = vlm.model
    inputs = model_inputs(vlm, conversations, add_vision_id=add_vision_id)
    device = next(model.parameters()).device
    prompt_ids = inputs["input_ids"]
    _check_context_length(model, prompt_ids.shape[1], settings.num_tokens)
    engine = resolve_engine(vlm, engine or vlm.engine, device)
    if choose is not None and engine != "fast":
        raise ValueError("choose= works with the fast engine only")

    captured: list[torch.Tensor] = []
    prompt_states: list[torch.Tensor] = []

    def capture(_module, _args, output):
        # Prefill sees the whole prompt, each decode step one new position; the last position is the one that
        # produced the next token (recipe section 4).
        if keep_prompt_states and not captured:
            prompt_states.append(output.detach())
        captured.append(output[:, -1:, :].detach())

    handle = final_norm(model).register_forward_hook(capture)
    try:
        with torch.inference_mode():
            if engine == "fast":
                first_logits, prompt_kv, first_positions = _prefill(vlm, inputs)
                handle.remove()  # the decode steps report their states themselves
                generated_ids, hidden_states = _decode_fast(
                    vlm, inputs, first_logits, prompt_kv, first_positions, captured[0], settings, on_token, choose
                )
            else:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    if settings.seed is not None and not settings.greedy:
                        torch.manual_seed(settings.seed)
                    output_ids = model.generate(**inputs, **_generate_kwargs(vlm, settings, on_token))
                generated_ids = output_ids[:, prompt_ids.shape[1] :]
                hidden_states = torch.cat(captured, dim=1)[:, : generated_ids.shape[1]]
    except _OUT_OF_MEMORY as error:
        captured.clear()  # let the states go before the caller frees memory
        vlm.release_device_buffers()
        images = int(inputs["image_grid_thw"].shape[0]) if "image_grid_thw" in inputs else 0
        raise VlmOutOfMemoryError(
            f"out of memory while the VLM read {prompt_ids.shape[1]} prompt tokens ({images} image(s)) and generated "
            f"{settings.num_tokens} tokens on {device}. Use fewer or smaller images, fewer tokens, or free memory "
            f"first (keep_model_loaded off, other models unloaded); or load the VLM 8-bit or 4-bit (quantization on "
            f"the loader, needs bitsandbytes), or on cpu. ({str(error).splitlines()[0]})"
        ) from error
    finally:
        handle.remove()

    lengths = _valid_lengths(vlm, generated_ids, settings)
    text = vlm.processor.batch_decode(generated_ids, skip_special_tokens=True)
    return VlmFeatures(
        hidden_states=hidden_states,
        generated_ids=generated_ids,
        lengths=lengths,
        prompt_ids=prompt_ids,
        text=text,
        source_model=vlm.source_model,
        prompt_states=prompt_states[0] if prompt_states else None,
    )


def _prefill_kwargs(vlm: VlmBundle) -> dict:
    """generate() for one token: transformers does the prefill (vision, M-RoPE, KV cache); we take its raw logits."""
    kwargs = _generate_kwargs(vlm, GenerationSettings(num_tokens=1, stop_at_eos=True, greedy=True), None)
    return {**kwargs, "return_dict_in_generate": True, "output_logits": True}


def _prefill(vlm: VlmBundle, inputs: dict) -> tuple[torch.Tensor, list, torch.Tensor]:
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
    cache = getattr(output, "cache", None)  # transformers 5.2x; earlier versions call it past_key_values
    if cache is None:
        cache = output.past_key_values
    batch, length = inputs["input_ids"].shape
    if positions and positions[0].numel() % (batch * length) == 0:
        first_positions = positions[0].reshape(-1, batch, length)[0, :, -1] + 1
    else:  # transformers 5's rope_deltas count real tokens: position = real length + delta
        mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
        deltas = getattr(vlm.model.model, "rope_deltas", None)
        first_positions = mask.long().sum(dim=1) + (deltas.view(-1).to(mask.device) if deltas is not None else 0)
    return output.logits[0], cache_layers(cache), first_positions


def _decode_fast(vlm: VlmBundle, inputs: dict, first_logits, prompt_kv, first_positions, last_prompt_state, settings, on_token, choose=None):
    """The remaining tokens through the fast engine; returns (generated_ids, hidden_states) as generate's path does.
    choose: the token choice (default: TokenChooser for `settings`)."""
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(inputs["input_ids"])
    eos_list = _eos_ids(vlm)
    eos_ids = torch.tensor(eos_list or [-1], device=mask.device)
    result = vlm.fast_decoder().decode(
        first_logits=first_logits,
        prompt_kv=prompt_kv,
        prompt_mask=mask,
        first_positions=first_positions,
        num_tokens=settings.num_tokens,
        choose=choose or TokenChooser(vlm, settings, mask.device),
        on_token=on_token,
        is_finished=(lambda ids: torch.isin(ids, eos_ids).any(dim=1)) if settings.stop_at_eos else None,
    )
    hidden_states = torch.cat([last_prompt_state, result.hidden_states], dim=1)
    generated_ids = result.generated_ids
    if settings.stop_at_eos:  # as generate: pad after a row's EOS, stop where every row has ended
        is_eos = torch.isin(generated_ids, eos_ids)
        after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
        generated_ids = generated_ids.masked_fill(after_eos, _pad_id(vlm, eos_list))
        if bool(is_eos.any(dim=1).all()):
            end = int((is_eos.int().argmax(dim=1) + 1).max())
            generated_ids, hidden_states = generated_ids[:, :end], hidden_states[:, :end]
    return generated_ids, hidden_states


class ForcedChoice:
    """Teacher forcing for comparisons: returns the given tokens step by step, and records what greedy decoding would
    have picked from our own logits and by how much that pick beat the forced token (0 where they agree).

    With `tokens` from another engine's greedy run, `disagreements()` counts the steps where our logits rank
    differently, and `max_margin()` (relative to the top logit's size) says whether all of them are near-ties within
    bf16 rounding (below about 2**-7) or real differences."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens
        self.greedy: list[torch.Tensor] = []
        self.margins: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, index: int) -> torch.Tensor:
        forced = self.tokens[:, index].to(logits.device)
        best = logits.argmax(dim=-1)
        top = logits.gather(1, best[:, None]).squeeze(1)
        self.greedy.append(best)
        # relative to the logit's size: bf16 keeps 8 bits, so margins under ~2**-7 are within its rounding
        self.margins.append((top - logits.gather(1, forced[:, None]).squeeze(1)) / top.abs().clamp_min(1.0))
        return forced

    def disagreements(self) -> int:
        return int((torch.stack(self.greedy, dim=1).cpu() != self.tokens[:, : len(self.greedy)].cpu()).sum())

    def max_margin(self) -> float:
        return float(torch.stack(self.margins).max()) if self.margins else 0.0


class TokenChooser:
    """The fast engine's token choice, with generate's processors in generate's order: suppressed vision tokens,
    EOS held back until the minimum length, then argmax, or temperature + top-p (HF's TopPLogitsWarper rule) and a
    draw from a private generator seeded by settings.seed (the global RNG is not touched)."""

    def __init__(self, vlm: VlmBundle, settings: GenerationSettings, device: torch.device) -> None:
        self.settings = settings
        self.min_tokens = 1 if settings.stop_at_eos else settings.num_tokens
        self.suppress = torch.tensor(_vision_token_ids(vlm), dtype=torch.long, device=device)
        self.eos = torch.tensor(_eos_ids(vlm), dtype=torch.long, device=device)
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


def _check_context_length(model, prompt_tokens: int, new_tokens: int) -> None:
    config = getattr(model.config, "text_config", model.config)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and prompt_tokens + new_tokens > limit:
        raise PromptError(
            f"the prompt is {prompt_tokens} tokens (images included) and {new_tokens} more are to be generated, but "
            f"the model handles at most {limit}. Shorten the text, use fewer or smaller images, or fewer tokens."
        )


def _pad_id(vlm: VlmBundle, eos_ids: list[int]) -> int:
    tokenizer = vlm.processor.tokenizer
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [0])[0]


def _eos_ids(vlm: VlmBundle) -> list[int]:
    eos = getattr(vlm.model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = vlm.processor.tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


_VISION_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def _vision_token_ids(vlm: VlmBundle) -> list[int]:
    """The model's vision placeholder ids: never a valid answer, so both engines suppress them."""
    ids = [getattr(vlm.model.config, name, None) for name in _VISION_TOKEN_FIELDS]
    return [token for token in ids if token is not None]


def _generate_kwargs(vlm: VlmBundle, settings: GenerationSettings, on_token) -> dict:
    transformers = import_transformers()
    eos_ids = _eos_ids(vlm)
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.num_tokens,
        # EOS suppressed until num_tokens: the official inference's min_tokens = max_tokens (recipe section 5).
        "min_new_tokens": 1 if settings.stop_at_eos else settings.num_tokens,
        "eos_token_id": eos_ids or None,
        "pad_token_id": _pad_id(vlm, eos_ids),
        # vLLM applies no repetition penalty; Qwen2-VL's generation_config.json asks for 1.05, and generate() would
        # fill it in from there (recipe section 5: only SamplingParams count).
        "repetition_penalty": 1.0,
    }
    # Vision placeholders are never a valid answer; a real VLM gives them ~0 probability, tiny random ones do not,
    # and a generated <|image_pad|> would break any later forward pass over the sequence.
    if vision_tokens := _vision_token_ids(vlm):
        kwargs["suppress_tokens"] = vision_tokens
    if settings.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    if on_token is not None:
        kwargs["stopping_criteria"] = transformers.StoppingCriteriaList([_TokenCallback(on_token)])
    return kwargs


class _TokenCallback:
    """A stopping criterion that never stops by itself: it reports each token, and its callback may raise."""

    def __init__(self, on_token: Callable[[int], None]) -> None:
        self.on_token = on_token
        self.count = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.count += 1
        self.on_token(self.count)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _valid_lengths(vlm: VlmBundle, generated_ids: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    batch, total = generated_ids.shape
    if not settings.stop_at_eos:
        return torch.full((batch,), total, dtype=torch.long)
    is_eos = torch.isin(generated_ids.cpu(), torch.tensor(_eos_ids(vlm) or [-1]))
    # length = position of the first EOS + 1 (the EOS vector itself is the state that produced it), else all.
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, torch.full((batch,), total))
    return first.long()


# --- inputs from image tensors -----------------------------------------------------------------------------------

LAYOUTS = ("in-context words", "free text")


def pil_images_from_tensor(images: torch.Tensor) -> list[Image.Image]:
    """(batch, height, width, channels) floats in [0, 1] (ComfyUI's IMAGE) -> RGB PIL images.

    Greyscale (1 channel) and RGBA (4 channels, alpha dropped onto white) are accepted.
    """
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[-1] not in (1, 3, 4):
        raise PromptError(f"expected images shaped (batch, height, width, 1|3|4 channels), got {tuple(images.shape)}")
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    out = []
    for array in pixels:
        if array.shape[-1] == 1:
            out.append(Image.fromarray(array[..., 0], mode="L").convert("RGB"))
        elif array.shape[-1] == 4:
            rgba = Image.fromarray(array, mode="RGBA")
            background = Image.new("RGB", rgba.size, "white")
            background.paste(rgba, mask=rgba.getchannel("A"))
            out.append(background)
        else:
            out.append(Image.fromarray(array, mode="RGB"))
    return out


def image_tensor_from_pil(image: Image.Image) -> torch.Tensor:
    """PIL -> ComfyUI IMAGE (1, height, width, 3) floats in [0, 1], as LoadImage outputs: the inverse of the above."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


def layout_content(layout: str, prompt: str, images: Sequence[Image.Image]) -> list[dict]:
    """User content for a layout name (see LAYOUTS): the encode node's single entry point to the prompt builders.

    "in-context words": one word per line; image k goes with word k; the last word is the query (CoBSAT layout).
    "free text": `<image>` markers in the text are replaced by the images in order (none: images first).
    """
    if layout == "in-context words":
        words = [line for line in prompt.splitlines() if line.strip()]
        return cobsat_content(words, images)
    if layout == "free text":
        return interleaved_content(prompt, images)
    raise PromptError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
