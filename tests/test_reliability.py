"""Bad input, untrusted files and faults around the VLM and the nodes (RELIABILITY.md lists every case and its test).

Training and extraction faults (SIGKILL, failed saves) are in test_reliability_training.py.
"""

from __future__ import annotations

import gc
import json
import shutil

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from nodes import NODE_CLASS_MAPPINGS
from thinkdiff_core import GenerationSettings, encode_with_vlm
from thinkdiff_core.errors import ModelFolderError, PromptError
from thinkdiff_core.hf_compat import final_norm
from thinkdiff_core.images import fit_pixel_budget, image_tensor_from_pil
from thinkdiff_core.prompts import chat_messages, interleaved_content
from thinkdiff_core.vlm import VlmOutOfMemoryError
from thinkdiff_core.vlm_loader import load_vlm


@pytest.fixture
def vlm_node(standalone_models):
    (vlm,) = NODE_CLASS_MAPPINGS["ThinkDiffVLMLoader"]().load("tiny-qwen2-vl", "float32", "cpu", "sdpa", False)
    return vlm


def encode(vlm, prompt, layout="free text", num_tokens=3, **images):
    result = NODE_CLASS_MAPPINGS["ThinkDiffVLMEncode"]().encode(
        vlm, prompt, layout, num_tokens, 1, 0.6, 0.9, True, False, **images
    )
    return result["result"][0]


# --- images -----------------------------------------------------------------------------------------------------


def test_no_images_with_in_context_words_says_what_to_connect(vlm_node):
    with pytest.raises(PromptError, match="connect one image for each word except the last"):
        encode(vlm_node, "red\nblue\ngreen", layout="in-context words")


def test_huge_image_is_scaled_into_the_pixel_budget(vlm_node):
    huge = torch.rand(1, 8000, 8000, 3)
    features = encode(vlm_node, "describe <image>", image_1=huge)
    assert features.hidden_states.shape == (1, 3, 64)
    scaled = fit_pixel_budget(Image.new("RGB", (8000, 8000)), max_pixels=vlm_node.model.max_image_pixels)
    assert scaled.width * scaled.height <= vlm_node.model.max_image_pixels


def test_rgba_greyscale_and_a_batch_of_sixteen(vlm_node):
    rgba = torch.rand(1, 40, 30, 4)
    grey = torch.rand(1, 40, 30, 1)
    batch = torch.rand(16, 28, 28, 3)
    features = encode(vlm_node, "<image> and <image>", image_1=rgba, image_2=grey)
    assert features.num_tokens == 3
    features = encode(vlm_node, "sixteen pictures", image_1=batch)
    assert features.num_tokens == 3


def test_sixteen_bit_pictures_keep_their_contrast():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    sixteen_bit = Image.fromarray(ramp)
    assert sixteen_bit.mode.startswith("I")
    image = fit_pixel_budget(sixteen_bit, max_pixels=10_000)
    values = np.asarray(image)[..., 0]
    assert values.min() == 0 and values.max() == 255  # not clipped to white, as PIL's own convert would


# --- text -------------------------------------------------------------------------------------------------------


def test_empty_text_without_images(vlm_node):
    with pytest.raises(PromptError, match="the prompt is empty"):
        encode(vlm_node, "")


def test_100_kb_of_text_is_refused_with_the_limit(vlm_node):
    with pytest.raises(PromptError, match="the model handles at most 4096.*Shorten the text"):
        encode(vlm_node, "lorem ipsum " * 8600)


def test_non_ascii_text_and_words(vlm_node, shape_images):
    features = encode(
        vlm_node,
        "赤\nblå\n緑 🟩",
        layout="in-context words",
        image_1=image_tensor_from_pil(shape_images[0]),
        image_2=image_tensor_from_pil(shape_images[1]),
    )
    assert features.num_tokens == 3 and isinstance(features.text[0], str)


def test_only_image_markers(vlm_node, shape_images):
    content = interleaved_content("<image><image>", shape_images)
    assert [part["type"] for part in content] == ["image", "image"]
    assert (
        encode(
            vlm_node,
            "<image><image>",
            image_1=image_tensor_from_pil(shape_images[0]),
            image_2=image_tensor_from_pil(shape_images[1]),
        ).num_tokens
        == 3
    )


# --- untrusted model folders ------------------------------------------------------------------------------------


def test_model_folder_with_its_own_code_is_refused_without_running_it(tiny_qwen2vl_dir, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_qwen2vl_dir, folder)
    marker = tmp_path / "ran"
    (folder / "modeling_custom.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageTextToText": "modeling_custom.Custom"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="ships its own Python code.*it was not run.*trust_remote_code"):
        load_vlm(folder, dtype=torch.float32)
    assert not marker.exists()


# --- faults -----------------------------------------------------------------------------------------------------


def test_out_of_memory_says_what_to_change(tiny_vlm, shape_images):
    def out_of_memory(count):
        if count == 2:  # the allocator's own exception, raised where generation would hit it
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    messages = chat_messages(interleaved_content("<image>", shape_images[:1]))
    with pytest.raises(torch.OutOfMemoryError) as caught:  # still an OOM, so ComfyUI unloads its models after it
        encode_with_vlm(tiny_vlm, messages, GenerationSettings(num_tokens=5, greedy=True), on_token=out_of_memory)
    assert isinstance(caught.value, VlmOutOfMemoryError)
    with pytest.raises(
        VlmOutOfMemoryError,
        match=r"out of memory while the VLM read \d+ prompt tokens \(1 image\(s\)\).*Use fewer or smaller images",
    ):
        encode_with_vlm(tiny_vlm, messages, GenerationSettings(num_tokens=5, greedy=True), on_token=out_of_memory)
    assert not final_norm(tiny_vlm.model)._forward_hooks  # the capture hook is gone after the failure


def test_cancel_stops_at_the_next_token_and_leaves_no_hook(tiny_vlm, shape_images):
    class Interrupted(Exception):  # what ComfyUI's progress bar raises on Cancel
        pass

    seen = []

    def cancel_after_two(count):
        seen.append(count)
        if count == 2:
            raise Interrupted

    messages = chat_messages(interleaved_content("<image>", shape_images[:1]))
    with pytest.raises(Interrupted):
        encode_with_vlm(tiny_vlm, messages, GenerationSettings(num_tokens=500, greedy=True), on_token=cancel_after_two)
    assert seen == [1, 2]
    assert not final_norm(tiny_vlm.model)._forward_hooks


def test_twenty_encodes_in_a_row_do_not_grow_memory(vlm_node, shape_images):
    images = {"image_1": image_tensor_from_pil(shape_images[0]), "image_2": image_tensor_from_pil(shape_images[1])}
    process = psutil.Process()
    for _ in range(3):  # warm-up: allocator pools, lazy imports
        encode(vlm_node, "red\nblue\ngreen", layout="in-context words", num_tokens=8, **images)
    gc.collect()
    before = process.memory_info().rss
    for _ in range(20):
        encode(vlm_node, "red\nblue\ngreen", layout="in-context words", num_tokens=8, **images)
    gc.collect()
    growth = process.memory_info().rss - before
    assert growth < 30 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 20 runs"
    assert not final_norm(vlm_node.model.model)._forward_hooks
