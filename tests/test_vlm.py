"""VLM encoding on a tiny real Qwen2-VL: the captured states, generation settings and prompt layouts."""

import pytest
import torch

from thinkdiff_core import GenerationSettings, encode_with_vlm
from thinkdiff_core.errors import ModelFolderError, PromptError
from thinkdiff_core.images import fit_pixel_budget, pil_images_from_tensor
from thinkdiff_core.prompts import COBSAT_QUESTION, chat_messages, cobsat_content, interleaved_content, layout_content
from thinkdiff_core.vlm import prepare_inputs
from thinkdiff_core.vlm_loader import load_vlm


def full_forward_final_states(vlm, messages, generated_ids):
    """Independent recomputation: one forward pass over prompt + generated tokens, last entry of hidden_states."""
    inputs = prepare_inputs(vlm, [messages])
    extra = generated_ids.shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], generated_ids], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in inputs:  # generated tokens are text (type 0)
        inputs["mm_token_type_ids"] = torch.cat(
            [inputs["mm_token_type_ids"], torch.zeros(1, extra, dtype=torch.long)], dim=1
        )
    with torch.no_grad():
        out = vlm.model(**inputs, output_hidden_states=True)
    return out.hidden_states[-1]


@pytest.fixture
def cobsat_messages(shape_images):
    return chat_messages(cobsat_content(["red", "blue", "green"], shape_images))


@pytest.mark.parametrize("greedy", [True, False])
def test_captured_states_match_full_forward(tiny_vlm, cobsat_messages, greedy):
    out = encode_with_vlm(tiny_vlm, cobsat_messages, GenerationSettings(num_tokens=6, greedy=greedy, seed=7))
    full = full_forward_final_states(tiny_vlm, cobsat_messages, out.generated_ids)
    start = out.prompt_ids.shape[1] - 1  # vector 0 = last prompt token (recipe section 4)
    assert out.hidden_states.shape == (1, 6, 64)
    torch.testing.assert_close(out.hidden_states, full[:, start : start + 6], atol=1e-4, rtol=1e-4)


def test_exact_token_count_even_past_eos(tiny_vlm, cobsat_messages):
    # Make EOS the overwhelming favourite: with EOS suppressed (official min_tokens = max_tokens), still 9 tokens.
    lm_head = tiny_vlm.model.lm_head
    eos = tiny_vlm.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    original = lm_head.bias
    lm_head.bias = torch.nn.Parameter(torch.zeros(lm_head.out_features))
    lm_head.bias.data[eos] = 1e4
    try:
        fixed = encode_with_vlm(tiny_vlm, cobsat_messages, GenerationSettings(num_tokens=9, greedy=True))
        stopping = encode_with_vlm(
            tiny_vlm, cobsat_messages, GenerationSettings(num_tokens=9, greedy=True, stop_at_eos=True)
        )
    finally:
        lm_head.bias = original
    assert fixed.generated_ids.shape == (1, 9) and fixed.lengths.tolist() == [9]
    assert eos not in fixed.generated_ids
    # precompute settings: min_tokens = 1 (recipe section 5), so EOS comes second and ends the row
    assert stopping.generated_ids[0, 1].item() == eos and stopping.lengths.tolist() == [2]


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(tiny_vlm, cobsat_messages):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = encode_with_vlm(tiny_vlm, cobsat_messages, GenerationSettings(num_tokens=8, seed=5))
    assert torch.equal(torch.rand(1), expected_next)
    b = encode_with_vlm(tiny_vlm, cobsat_messages, GenerationSettings(num_tokens=8, seed=5))
    c = encode_with_vlm(tiny_vlm, cobsat_messages, GenerationSettings(num_tokens=8, seed=6))
    assert torch.equal(a.generated_ids, b.generated_ids)
    assert not torch.equal(a.generated_ids, c.generated_ids)


def test_progress_callback_ticks_per_token_and_can_cancel(tiny_vlm, cobsat_messages):
    seen = []
    encode_with_vlm(tiny_vlm, cobsat_messages, GenerationSettings(num_tokens=5, greedy=True), on_token=seen.append)
    assert seen == [1, 2, 3, 4, 5]

    class Cancelled(Exception):
        pass

    def cancel_at_three(count):
        if count == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        encode_with_vlm(
            tiny_vlm, cobsat_messages, GenerationSettings(num_tokens=50, greedy=True), on_token=cancel_at_three
        )


def test_batch_of_conversations_left_padded(tiny_vlm, shape_images):
    short = chat_messages(interleaved_content("Describe <image>", shape_images[:1]))
    long = chat_messages(cobsat_content(["red", "blue", "green"], shape_images))
    out = encode_with_vlm(tiny_vlm, [short, long], GenerationSettings(num_tokens=4, greedy=True))
    single = encode_with_vlm(tiny_vlm, short, GenerationSettings(num_tokens=4, greedy=True))
    assert out.hidden_states.shape == (2, 4, 64) and len(out.text) == 2
    assert torch.equal(out.generated_ids[0], single.generated_ids[0])
    torch.testing.assert_close(out.hidden_states[0], single.hidden_states[0], atol=1e-4, rtol=1e-4)


def test_prompt_states_for_the_input_token_ablation(tiny_vlm, cobsat_messages):
    out = encode_with_vlm(
        tiny_vlm, cobsat_messages, GenerationSettings(num_tokens=2, greedy=True), keep_prompt_states=True
    )
    assert out.prompt_states.shape == (1, out.prompt_ids.shape[1], 64)
    torch.testing.assert_close(out.prompt_states[:, -1:], out.hidden_states[:, :1])


def test_cobsat_layout_renders_official_text(tiny_vlm, shape_images):
    messages = chat_messages(cobsat_content(["red", "blue", "green"], shape_images))
    text = tiny_vlm.processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, add_vision_id=True
    )
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    expected_user = (
        f"{COBSAT_QUESTION}\n\nWord 1: red, Picture 1: {vision}\n\nWord 2: blue, Picture 2: {vision}\n\nWord 3: green, "
    )
    assert (
        f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{expected_user}<|im_end|>\n<|im_start|>assistant\n"
        == text
    )


def test_layouts_and_their_errors(shape_images):
    assert [p["type"] for p in layout_content("free text", "a <image> b <image>", shape_images)] == [
        "text",
        "image",
        "text",
        "image",
    ]
    assert [p["type"] for p in layout_content("free text", "a dog in this style", shape_images[:1])] == [
        "image",
        "text",
    ]
    with pytest.raises(PromptError, match="2 '<image>' marker"):
        layout_content("free text", "<image> <image>", shape_images[:1])
    with pytest.raises(PromptError, match="one word per image plus a final query word"):
        layout_content("in-context words", "red\nblue", shape_images)
    with pytest.raises(PromptError, match="prompt is empty"):
        layout_content("free text", "   ", [])
    with pytest.raises(PromptError, match="unknown layout"):
        layout_content("sideways", "x", [])


def test_image_tensors_in_any_channel_count():
    grey = torch.rand(2, 30, 20, 1)
    rgba = torch.zeros(1, 10, 10, 4)
    rgba[..., 0] = 1.0  # red, fully transparent -> white background
    images = pil_images_from_tensor(grey) + pil_images_from_tensor(rgba)
    assert [im.mode for im in images] == ["RGB"] * 3 and images[0].size == (20, 30)
    assert images[2].getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(PromptError, match="channels"):
        pil_images_from_tensor(torch.rand(1, 4, 4, 2))


def test_huge_image_fits_pixel_budget():
    from PIL import Image

    image = fit_pixel_budget(Image.new("RGB", (8000, 6000)), max_pixels=1_000_000)
    assert image.width * image.height <= 1_000_000 and abs(image.width / image.height - 8 / 6) < 0.01


def test_load_vlm_errors_name_the_fix(tmp_path, tiny_qwen2vl_dir):
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_vlm(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="no config.json"):
        load_vlm(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text((tiny_qwen2vl_dir / "config.json").read_text())
    with pytest.raises(ModelFolderError, match="no weights"):
        load_vlm(tmp_path / "empty")


def test_unknown_attention_backend_falls_back(tiny_qwen2vl_dir):
    vlm = load_vlm(tiny_qwen2vl_dir, dtype=torch.float32, attn_implementation="flash_attention_2")
    assert vlm.model.config._attn_implementation in ("sdpa", "eager")


def test_model_generation_config_cannot_add_a_repetition_penalty(tiny_vlm, cobsat_messages):
    """Qwen2-VL's generation_config.json asks for repetition_penalty 1.05; the official vLLM sampling uses none."""
    plain = encode_with_vlm(tiny_vlm, cobsat_messages, GenerationSettings(num_tokens=12, greedy=True))
    config = tiny_vlm.model.generation_config
    config.repetition_penalty = 50.0  # huge, so that applying it would surely change the greedy tokens
    try:
        penalised = encode_with_vlm(tiny_vlm, cobsat_messages, GenerationSettings(num_tokens=12, greedy=True))
    finally:
        config.repetition_penalty = 1.0
    assert torch.equal(plain.generated_ids, penalised.generated_ids)


def test_picture_labels_only_when_asked(tiny_vlm, cobsat_messages):
    tokenizer = tiny_vlm.processor.tokenizer
    labelled = encode_with_vlm(
        tiny_vlm, cobsat_messages, GenerationSettings(num_tokens=1, greedy=True), add_vision_id=True
    )
    plain = encode_with_vlm(tiny_vlm, cobsat_messages, GenerationSettings(num_tokens=1, greedy=True))
    assert "Picture 2: " in tokenizer.decode(labelled.prompt_ids[0])
    assert "Picture" not in tokenizer.decode(plain.prompt_ids[0])
