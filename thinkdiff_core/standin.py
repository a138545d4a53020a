"""Tiny stand-in models with random weights, built locally from small configs, for the offline demo and the tests.

They have the real architectures (Qwen2-VL, T5, FLUX, the aligner) at toy sizes and produce gibberish text and
noise images: they show that the plumbing works, never what ThinkDiff does. Nothing here downloads anything.
Tokenizers are byte-level BPEs trained in well under a second on the small corpus below.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .aligner import AlignerSpec, ThinkDiffAligner
from .standin_pictures import (  # noqa: F401 (the pictures are part of this module's interface)
    SHAPE_BACKGROUNDS,
    SHAPE_COLORS,
    SHAPE_KINDS,
    draw_shape_image,
    draw_shape_picture,
    shape_caption,
)

STANDIN_LABEL = "STAND-IN RUN: tiny random-weight models built locally; the text is gibberish and the image is noise"

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Renders the same layout as Qwen2-VL's own template, including "Picture k: " labels when add_vision_id is set.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "You are a helpful assistant.",
    "I give you several words and pictures. First, please analyse what the next picture is.",
    "Then give me a detailed diffusion prompt to describe the next picture.",
    "Please only provide me the detailed prompt and start the answer with 'Create an image'.",
    "Word 1: red, Word 2: blue, Word 3: green, Picture 1: Picture 2:",
    "Create an image of a green car on a sunny street, detailed, photorealistic.",
    "Describe the image concisely. Generate a prompt that can recreate the image in a 2D diffusion model.",
    "a yellow leaf, a white hat, a red cup, a purple chair, a pink car, an orange box, a brown book, a black bag",
    "zebra tiger sheep pig monkey lion dog cow cat bird watercolor sketch pixel origami lego icon graffiti",
    "beach desert glacier volcano park gym waterfall space cave seafloor wood wicker metal leather lace denim",
    "a photo of a dog in the style of this picture, soft light, high quality, 4k",
]


def train_bpe_tokenizer(
    special_tokens: list[str], vocab_size: int = 384, corpus: list[str] | None = None, wrap: bool = True
):
    """A byte-level BPE tokenizer trained on `corpus`, wrapped in PreTrainedTokenizerFast (`wrap=False`: the bare
    `tokenizers.Tokenizer`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((corpus or CORPUS) * 4, trainer=trainer)
    if not wrap:
        return tokenizer
    from transformers import PreTrainedTokenizerFast

    # the inputs of the real CLIP, T5 and Qwen2 tokenizers (a generic one adds token_type_ids, which CLIP refuses)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_input_names=["input_ids", "attention_mask"])


def build_qwen2vl(path: str | Path, hidden_size: int = 64, seed: int = 0) -> Path:
    """Save a tiny Qwen2-VL as a Hugging Face folder at `path`, laid out as Qwen/Qwen2-VL-7B-Instruct ships it.

    The files are written here rather than by the installed transformers' save_pretrained, so that the folder is the
    same on every transformers version and loads on all of them, as a downloaded one does: a flat config.json with
    `rope_scaling: {type: mrope, mrope_section}`, a Qwen2Tokenizer (tokenizer.json, vocab.json, merges.txt,
    tokenizer_config.json), preprocessor_config.json, chat_template.json, generation_config.json and the weights
    (model.safetensors; transformers writes them under the released checkpoints' key names on 4.5x and 5.x).
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe_tokenizer(QWEN_SPECIAL_TOKENS, wrap=False)
    ids = {token: tokenizer.token_to_id(token) for token in QWEN_SPECIAL_TOKENS}
    config = qwen2vl_config_dict(tokenizer.get_vocab_size(), ids, hidden_size)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_dict(copy.deepcopy(config))).eval()  # it edits the dict
    model.save_pretrained(path)  # the weights; config.json and generation_config.json are rewritten below
    _write_json(path / "config.json", config)
    _write_json(
        path / "generation_config.json",
        {
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "pad_token_id": ids["<|endoftext|>"],
        },
    )
    _save_qwen2_tokenizer(tokenizer, path)
    _write_json(
        path / "preprocessor_config.json",
        dict(
            min_pixels=28 * 28,
            max_pixels=56 * 56 * 4,
            patch_size=14,
            temporal_patch_size=2,
            merge_size=2,
            image_mean=[0.48145466, 0.4578275, 0.40821073],
            image_std=[0.26862954, 0.26130258, 0.27577711],
            image_processor_type="Qwen2VLImageProcessor",
            processor_class="Qwen2VLProcessor",
        ),
    )
    _write_json(path / "chat_template.json", {"chat_template": QWEN_CHAT_TEMPLATE})
    return path


def qwen2vl_config_dict(vocab_size: int, ids: dict[str, int], hidden_size: int = 64) -> dict:
    """A tiny Qwen2-VL config.json in the released checkpoints' flat form (every transformers version reads it)."""
    heads = 4
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": 77,  # odd on purpose: catches swapped dimensions
        "max_position_embeddings": 4096,
        "max_window_layers": 2,
        "num_attention_heads": heads,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": _mrope_section(hidden_size // heads)},
        "sliding_window": 4096,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab_size,
        "vision_config": dict(
            depth=2, embed_dim=32, mlp_ratio=2, num_heads=4, in_chans=3, hidden_size=hidden_size, patch_size=14,
            spatial_merge_size=2, spatial_patch_size=14, temporal_patch_size=2
        ),
    }  # fmt: skip


def _save_qwen2_tokenizer(tokenizer, path: Path) -> None:
    """tokenizer.json, vocab.json, merges.txt and a tokenizer_config.json of class Qwen2Tokenizer (AutoTokenizer
    gives Qwen2TokenizerFast on transformers 4.x, the tokenizers-backed Qwen2Tokenizer on 5.x)."""
    tokenizer.save(str(path / "tokenizer.json"))
    tokenizer.model.save(str(path))  # vocab.json and merges.txt
    flags = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    added = {str(tokenizer.token_to_id(token)): dict(content=token, **flags) for token in QWEN_SPECIAL_TOKENS}
    _write_json(
        path / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": [token for token in QWEN_SPECIAL_TOKENS if token != "<|endoftext|>"],
            "bos_token": None,
            "chat_template": QWEN_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 32768,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _mrope_section(head_dim: int) -> list[int]:
    # The temporal/height/width sections must add up to half the head dimension.
    half = head_dim // 2
    return [half - 2 * (half // 4), half // 4, half // 4]


def build_aligner(
    input_dim: int, output_dim: int = 4096, source_model: str = "tiny-qwen2-vl", seed: int = 0, num_tokens: int = 16
) -> ThinkDiffAligner:
    """A random aligner (PyTorch's default Linear init, norm weight 1)."""
    torch.manual_seed(seed)
    return ThinkDiffAligner(
        AlignerSpec("lvlm", input_dim, output_dim, source_model=source_model, num_tokens=num_tokens)
    )


T5_WIDTH = 4096  # T5-XXL's hidden size: the token width every stand-in base is conditioned on
# The tiny FLUX transformer's dims (one block of each kind, real T5-XXL width); Chroma's stand-in shares them.
TINY_FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=T5_WIDTH,
)


def bpe_clip_tokenizer():
    """A CLIP-like BPE tokenizer: <|startoftext|> (id 0) and <|endoftext|> (id 1, also padding), 77 tokens."""
    tokenizer = train_bpe_tokenizer(["<|startoftext|>", "<|endoftext|>"], vocab_size=320)
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = "<|startoftext|>", "<|endoftext|>", "<|endoftext|>"
    tokenizer.model_max_length = 77
    return tokenizer


def bpe_t5_tokenizer(corpus: list[str] | None = None):
    """A T5-like BPE tokenizer: <pad>, </s>, <unk>, 512 tokens."""
    tokenizer = train_bpe_tokenizer(["<pad>", "</s>", "<unk>"], vocab_size=320, corpus=corpus)
    tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token = "<pad>", "</s>", "<unk>"
    tokenizer.model_max_length = 512
    return tokenizer


def tiny_t5_encoder(vocab_size: int):
    """A one-layer T5 encoder of T5-XXL's width (4096)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=T5_WIDTH, d_ff=37, d_kv=8, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    return T5EncoderModel(config).eval()


def tiny_vae(latent_channels: int = 4, scaling_factor: float = 1.0, shift_factor: float | None = None):
    """A two-block AutoencoderKL (RGB, 8x and 16x channels)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=latent_channels,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def build_flux_pipeline(seed: int = 0):
    """A diffusers FluxPipeline of tiny random parts that still takes real-width inputs: T5 tokens of width 4096
    and a CLIP-L pooled vector of width 768, so real aligner outputs fit it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        **TINY_FLUX_TRANSFORMER, pooled_projection_dim=768, axes_dims_rope=[4, 6, 6], guidance_embeds=True
    )
    clip_tokenizer = bpe_clip_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(**_clip_text_config(len(clip_tokenizer), hidden_size=768)))
    t5_tokenizer = bpe_t5_tokenizer()
    t5 = tiny_t5_encoder(len(t5_tokenizer))
    vae = tiny_vae(scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's VAE values
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip.eval(),
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer.eval(),
    )


def build_t5(path: str | Path, d_model: int = 32, seed: int = 0, corpus: list[str] | None = None) -> Path:
    """Save a tiny flan-T5 stand-in (T5ForConditionalGeneration + tokenizer with <pad>, </s>, <unk>) at `path`.

    Plays the frozen proxy decoder (and, for the CLIP variant, text encoder) of the training recipe.
    """
    from transformers import T5Config, T5ForConditionalGeneration

    path = Path(path)
    captions = [shape_caption(c, s, b) for c in SHAPE_COLORS for s in SHAPE_KINDS for b in SHAPE_BACKGROUNDS]
    tokenizer = bpe_t5_tokenizer(corpus=(corpus or CORPUS) + captions)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_ff=37,  # odd on purpose: catches swapped dimensions
        d_kv=8,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        feed_forward_proj="gated-gelu",  # as flan-T5 (T5 v1.1)
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,  # T5 starts decoding from <pad>; must be set in transformers 5
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        # A non-trivial final norm, so that copying it into the aligner is visible in tests; and an output layer
        # scaled like a trained model's (T5's default init gives logits so large that the first loss is ~25).
        model.encoder.final_layer_norm.weight.uniform_(0.5, 1.5)
        model.lm_head.weight.normal_(0.0, d_model**-0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_blip2_vision(path: str | Path, hidden_size: int = 48, seed: int = 0, full_blip2_layout: bool = False) -> Path:
    """Save a tiny BLIP-2 vision tower (224 px, patch 14: 1 CLS + 16x16 patches, like EVA ViT-g) at `path`.

    full_blip2_layout: write it the way a full BLIP-2 repository stores it (config.json of model_type 'blip-2' with a
    `vision_config`, weights under `vision_model.*` next to other modules' keys), to test loading from such a folder.
    """

    from safetensors.torch import save_file
    from transformers import Blip2VisionConfig, Blip2VisionModel

    path = Path(path)
    config = Blip2VisionConfig(
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=224,
        patch_size=14,
    )
    torch.manual_seed(seed)
    model = Blip2VisionModel(config).eval()
    with torch.no_grad():  # BLIP-2's initializer_range is 1e-10; give the tower visible weights
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.05)
    if not full_blip2_layout:
        model.save_pretrained(path)
        return path
    path.mkdir(parents=True, exist_ok=True)
    state = {f"vision_model.{key}": value.contiguous() for key, value in model.state_dict().items()}
    state["query_tokens"] = torch.zeros(1, 4, 8)  # a non-vision key, as in the real file
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "blip-2", "vision_config": config.to_diff_dict()}))
    return path


def save_flux_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Save `build_flux_pipeline()` as a diffusers pipeline folder (model_index.json + components) at `path`."""
    path = Path(path)
    build_flux_pipeline(seed=seed).save_pretrained(path)
    return path


def build_clip(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny CLIPModel + CLIPProcessor (32 px images, patch 8, width 32) at `path`: the CLIP-proxy judge stand-in."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    path = Path(path)
    tokenizer = bpe_clip_tokenizer()
    config = CLIPConfig(
        text_config=_clip_text_config(len(tokenizer), hidden_size=32),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def _clip_text_config(vocab_size: int, hidden_size: int) -> dict:
    """A one-layer CLIP text tower over a BPE tokenizer whose ids 0 and 1 are <|startoftext|> and <|endoftext|>."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
