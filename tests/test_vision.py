"""thinkdiff_core.vision: BLIP-2 vision tokens for ThinkDiff-CLIP (recipe section 7), on a tiny real Blip2VisionModel."""

from __future__ import annotations

import pytest
import torch
from torchvision import transforms

from thinkdiff_core import standin
from thinkdiff_core.errors import ModelFolderError
from thinkdiff_core.vision import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    encode_images,
    load_vision_encoder,
    pool_vision_tokens,
    preprocess_images,
)


@pytest.fixture(scope="module")
def vision_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip2")
    return standin.build_blip2_vision(root / "tower"), standin.build_blip2_vision(root / "full", full_blip2_layout=True)


def test_pooling_gives_65_tokens_equal_to_2x2_averages():
    # Bilinear resize by exactly 1/2 with align_corners=False samples between 4 pixels: the mean of each 2x2 block.
    hidden = torch.randn(3, 257, 11)
    pooled = pool_vision_tokens(hidden, downsample_factor=2)
    assert pooled.shape == (3, 65, 11)
    grid = hidden[:, 1:].reshape(3, 16, 16, 11)
    blocks = grid.reshape(3, 8, 2, 8, 2, 11).mean(dim=(2, 4)).reshape(3, 64, 11)
    torch.testing.assert_close(pooled[:, 0], hidden[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(pooled[:, 1:], blocks)
    assert pool_vision_tokens(hidden, downsample_factor=1) is hidden
    with pytest.raises(ValueError, match="square patch grid"):
        pool_vision_tokens(torch.randn(1, 100, 4))


def test_preprocessing_matches_the_official_torchvision_pipeline():
    images = [
        standin.draw_shape_picture("red", "triangle", size=70),
        standin.draw_shape_picture("blue", "circle", "grey", size=50),
    ]
    official = transforms.Compose(
        [
            transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        ]
    )
    torch.testing.assert_close(preprocess_images(images), torch.stack([official(image) for image in images]))
    comfy_images = torch.stack(
        [torch.from_numpy(__import__("numpy").asarray(image, dtype="float32") / 255) for image in images[:1]]
    )
    torch.testing.assert_close(preprocess_images(comfy_images), preprocess_images(images[:1]), atol=1e-6, rtol=0)


def test_encode_images_is_pooled_post_layernorm_state(vision_dirs):
    model = load_vision_encoder(vision_dirs[0], dtype=torch.float32)
    images = [standin.draw_shape_picture("green", "square"), standin.draw_shape_picture("pink", "circle", "lightblue")]
    tokens = encode_images(model, images)
    assert tokens.shape == (2, 65, 48)
    with torch.no_grad():
        last = model(pixel_values=preprocess_images(images)).last_hidden_state
        manual = model.post_layernorm(
            model.encoder(inputs_embeds=model.embeddings(preprocess_images(images))).last_hidden_state
        )
    torch.testing.assert_close(last, manual)
    torch.testing.assert_close(tokens, pool_vision_tokens(manual))
    assert encode_images(model, images, as_one_sequence=True).shape == (1, 130, 48)  # images in order, 65 each


def test_vision_tower_loads_from_a_full_blip2_folder(vision_dirs):
    alone, full = (load_vision_encoder(path, dtype=torch.float32) for path in vision_dirs)
    image = [standin.draw_shape_picture("yellow", "triangle")]
    torch.testing.assert_close(encode_images(full, image), encode_images(alone, image), rtol=0, atol=0)
    assert not any(p.requires_grad for p in full.parameters())


def test_a_folder_that_is_not_blip2_is_refused(tmp_path, vision_dirs):
    with pytest.raises(ModelFolderError, match="config.json"):
        load_vision_encoder(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ModelFolderError, match="not BLIP-2"):
        load_vision_encoder(tmp_path)
