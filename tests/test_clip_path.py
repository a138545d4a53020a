"""ThinkDiff-CLIP through the node classes: BLIP-2 tower (folder or extracted file), 65 tokens per image,
composition with text in the recipe's order, and the refusals."""

from pathlib import Path

import pytest
import torch

from nodes import NODE_CLASS_MAPPINGS, comfy_adapter
from thinkdiff_core import AlignerSpec, ThinkDiffAligner, save_aligner, standin
from thinkdiff_core.errors import AlignerMismatchError, ModelFolderError
from thinkdiff_core.images import image_tensor_from_pil
from thinkdiff_core.vision import extract_vision_tower, is_vision_tower_file, load_vision_encoder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clip_models(tmp_path_factory):
    """models/clip_vision/blip2-tiny (full BLIP-2 layout), models/thinkdiff/blip2_vision_tower.safetensors (extracted)
    and a clip aligner 48 -> 4096."""
    root = tmp_path_factory.mktemp("clip_models")
    standin.build_blip2_vision(root / "clip_vision" / "blip2-tiny", full_blip2_layout=True)
    extract_vision_tower(root / "clip_vision" / "blip2-tiny", root / "thinkdiff" / "blip2_vision_tower.safetensors")
    torch.manual_seed(0)
    aligner = ThinkDiffAligner(AlignerSpec("clip", 48, 4096, source_model="blip2-tiny"))
    save_aligner(aligner, root / "thinkdiff" / "tiny-clip.safetensors")
    comfy_adapter.set_models_root(root)
    yield root
    comfy_adapter.set_models_root(None)


def image(color, shape="square"):
    return image_tensor_from_pil(standin.draw_shape_image(color, shape))


def load(name):
    (vision,) = NODE_CLASS_MAPPINGS["ThinkDiffVisionLoader"]().load(name, "float32", "cpu")
    return vision


def managed(aligner):
    """An aligner as the loader node hands it on (under the adapter's model management)."""
    return comfy_adapter.manage(aligner, aligner, torch.device("cpu"))


def encode(vision, *images, grid="8x8 (65 tokens, recipe)"):
    extra = {f"image_{i}": im for i, im in enumerate(images[1:], start=2)}
    return NODE_CLASS_MAPPINGS["ThinkDiffVisionEncode"]().encode(vision, images[0], grid, **extra)[0]


def test_loader_lists_folders_and_extracted_files(clip_models):
    assert comfy_adapter.list_vision_encoders() == ["blip2-tiny", "blip2_vision_tower.safetensors"]
    assert not is_vision_tower_file(clip_models / "thinkdiff" / "tiny-clip.safetensors")  # aligners are not listed


def test_extracted_file_equals_the_full_folder(clip_models):
    red = image("red")
    from_folder = encode(load("blip2-tiny"), red)
    from_file = encode(load("blip2_vision_tower.safetensors"), red)
    assert from_folder.hidden_states.shape == (1, 65, 48)
    torch.testing.assert_close(from_folder.hidden_states, from_file.hidden_states)
    from safetensors import safe_open

    with safe_open(str(clip_models / "thinkdiff" / "blip2_vision_tower.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert "query_tokens" not in keys and keys == set(
        load_vision_encoder(clip_models / "clip_vision" / "blip2-tiny").state_dict()
    )


def test_extract_vision_command(clip_models, tmp_path, capsys):
    from thinkdiff_core.__main__ import main

    assert (
        main(["extract-vision", str(clip_models / "clip_vision" / "blip2-tiny"), str(tmp_path / "t.safetensors")]) == 0
    )
    assert is_vision_tower_file(tmp_path / "t.safetensors") and "wrote" in capsys.readouterr().out
    assert main(["extract-vision", str(tmp_path / "nothing"), str(tmp_path / "u.safetensors")]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_images_in_order_and_token_grids(clip_models):
    vision = load("blip2-tiny")
    red, blue = image("red"), image("blue", "circle")
    pair = encode(vision, red, blue)
    assert pair.hidden_states.shape == (1, 130, 48) and pair.num_images == 2
    torch.testing.assert_close(pair.hidden_states[:, :65], encode(vision, red).hidden_states)
    torch.testing.assert_close(pair.hidden_states[:, 65:], encode(vision, blue).hidden_states)
    batch = encode(vision, torch.cat([red, blue]))  # an IMAGE batch counts as several images
    torch.testing.assert_close(batch.hidden_states, pair.hidden_states)
    assert encode(vision, red, grid="4x4 (17 tokens)").hidden_states.shape == (1, 17, 48)
    assert encode(vision, red, grid="16x16 (257 tokens)").hidden_states.shape == (1, 257, 48)


def test_clip_conditioning_follows_the_recipe_order(clip_models):
    """Image tokens first, then the text's T5 tokens trimmed from ComfyUI's 256 to the recipe's 128: 65 + 128 = 193."""
    features = encode(load("blip2-tiny"), image("red"))
    (aligner,) = NODE_CLASS_MAPPINGS["ThinkDiffAlignerLoader"]().load("tiny-clip.safetensors")
    text = [[torch.randn(1, 256, 4096), {"pooled_output": torch.randn(1, 768), "guidance": 3.5}]]
    (conditioning,) = NODE_CLASS_MAPPINGS["ThinkDiffConditioning"]().apply(aligner, features, "prepend", 1.0, text, 128)
    cond, options = conditioning[0]
    assert cond.shape == (1, 193, 4096)
    torch.testing.assert_close(cond[:, :65], aligner.model(features.hidden_states), atol=1e-5, rtol=1e-5)
    assert torch.equal(cond[:, 65:], text[0][0][:, :128])
    assert options["pooled_output"] is text[0][1]["pooled_output"]  # CLIP-L pooled of the prompt text (recipe)


def test_variant_and_width_mismatches_are_refused(clip_models, models_root):
    features = encode(load("blip2-tiny"), image("red"))
    lvlm_aligner = standin.build_aligner(input_dim=48, output_dim=64)
    with pytest.raises(
        AlignerMismatchError, match="'lvlm' aligner, but the features come from a vision encoder.*Load a 'clip' aligner"
    ):
        NODE_CLASS_MAPPINGS["ThinkDiffConditioning"]().apply(managed(lvlm_aligner), features, "prepend", 1.0)
    wide = ThinkDiffAligner(AlignerSpec("clip", 1408, 64, source_model="Salesforce/blip2-flan-t5-xxl"))
    with pytest.raises(
        AlignerMismatchError, match="expects 1408-dim features .trained on Salesforce/blip2-flan-t5-xxl.*48-dim"
    ):
        NODE_CLASS_MAPPINGS["ThinkDiffConditioning"]().apply(managed(wide), features, "prepend", 1.0)


def test_vision_loader_errors(clip_models, tmp_path):
    with pytest.raises(ModelFolderError, match="was not found in models/clip_vision or models/thinkdiff"):
        load("missing")
    bogus = tmp_path / "bogus.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, bogus)
    with pytest.raises(ModelFolderError, match="not made by 'python -m thinkdiff_core extract-vision'"):
        load_vision_encoder(bogus)
