"""The ThinkDiff-CLIP recipe's text part, exactly: the official inference encodes the prompt with T5 padded to 128
tokens and no attention mask (diffusers FluxPipeline, recipe section 10); in ComfyUI that is T5TokenizerOptions
(min_length 128, min_padding 0) before the text encode. This compares, on a tiny T5, the tokens the pack's
conditioning path produces from a 128-token encoding with an official-style encoding, and shows that trimming
ComfyUI's default 256-token encoding to 128 (`text_tokens` 128) is close to but not the same."""

from __future__ import annotations

import pytest
import torch

from nodes import NODE_CLASS_MAPPINGS, comfy_adapter
from thinkdiff_core import AlignerSpec, ThinkDiffAligner, standin
from thinkdiff_core.vision import VisionFeatures

TEXT = "a photo of a dog in the style of this picture"


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """The tiny flan-T5 stand-in's encoder and tokenizer, the tokenizer appending </s> as T5TokenizerFast does."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer, T5EncoderModel

    path = standin.build_t5(tmp_path_factory.mktemp("t5") / "tiny-t5", d_model=32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos = tokenizer.eos_token_id
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return T5EncoderModel.from_pretrained(path).eval(), tokenizer


def official_encoding(t5, text: str, length: int = 128) -> torch.Tensor:
    """diffusers' FLUX T5 path: tokenizer(padding="max_length", max_length=128, truncation=True), encoder without a
    mask."""
    encoder, tokenizer = t5
    ids = tokenizer(text, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(input_ids=ids).last_hidden_state


def comfy_encoding(t5, text: str, min_length: int, min_padding: int = 0) -> torch.Tensor:
    """ComfyUI's SDTokenizer for T5 (comfy/sd1_clip.py, both versions): the words' tokens, the end token, then
    min_padding pad tokens and pad tokens up to min_length (256 by default for FLUX; T5TokenizerOptions sets it);
    encoded without a mask (FLUX's T5 has none)."""
    encoder, tokenizer = t5
    ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids += [tokenizer.pad_token_id] * min_padding
    ids += [tokenizer.pad_token_id] * max(0, min_length - len(ids))
    with torch.no_grad():
        return encoder(input_ids=torch.tensor([ids])).last_hidden_state


def pack_conditioning(text_states: torch.Tensor, text_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ThinkDiffConditioning (prepend) on one picture's 65 vision tokens and a FLUX text conditioning."""
    torch.manual_seed(0)
    model = ThinkDiffAligner(AlignerSpec("clip", 48, text_states.shape[-1], source_model="blip2-tiny")).eval()
    aligner = comfy_adapter.manage(model, model, torch.device("cpu"))
    features = VisionFeatures(hidden_states=torch.randn(1, 65, 48), num_images=1, source_model="blip2-tiny")
    base = [[text_states, {"pooled_output": torch.randn(1, 768), "guidance": 3.5}]]
    node = NODE_CLASS_MAPPINGS["ThinkDiffConditioning"]()
    (conditioning,) = node.apply(aligner, features, "prepend", 1.0, base, text_tokens)
    return conditioning[0][0], model(features.hidden_states).detach()


def test_ids_of_comfyui_at_128_equal_the_official_padding(t5):
    _, tokenizer = t5
    official = tokenizer(TEXT, padding="max_length", max_length=128, truncation=True).input_ids
    words = tokenizer(TEXT, add_special_tokens=False).input_ids
    assert official == words + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (127 - len(words))


def test_encoding_at_128_gives_the_official_token_layout(t5):
    official = official_encoding(t5, TEXT)
    cond, image_tokens = pack_conditioning(comfy_encoding(t5, TEXT, min_length=128), text_tokens=0)
    assert cond.shape == (1, 65 + 128, 32)
    torch.testing.assert_close(cond[:, :65], image_tokens, atol=1e-5, rtol=1e-5)  # picture tokens first
    torch.testing.assert_close(cond[:, 65:], official, atol=0, rtol=0)  # then exactly the official text tokens


def test_trimming_a_256_token_encoding_is_not_the_same(t5):
    """T5 is bidirectional and FLUX's T5 runs without a mask, so pads 128..255 change tokens 0..127."""
    official = official_encoding(t5, TEXT)
    cond, _ = pack_conditioning(comfy_encoding(t5, TEXT, min_length=256), text_tokens=128)
    assert cond.shape == (1, 193, 32)  # the right length...
    relative = ((cond[:, 65:] - official).norm() / official.norm()).item()
    assert relative > 1e-4, relative  # ...but not the recipe's tokens (17% relative on this tiny T5)
