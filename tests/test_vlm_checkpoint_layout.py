"""The tiny Qwen2-VL folder is laid out as the released checkpoints are, on every transformers leg, and the loader
accepts the released variants a user downloads: a tied output layer (Qwen2-VL-2B ships no lm_head.weight) and
weights split into shards with an index. A loader check that passed only on the installed transformers' own key
names would refuse (or silently randomise) a real folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from thinkdiff_core.errors import ModelFolderError
from thinkdiff_core.vlm_loader import load_vlm

# The top-level key groups of Qwen/Qwen2-VL-{2B,7B}-Instruct's model.safetensors.index.json.
RELEASED_GROUPS = {"lm_head", "model.embed_tokens", "model.layers", "model.norm", "visual.blocks", "visual.merger"}


def _keys(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return sorted(handle.keys())


def test_standin_weights_use_the_released_key_names(tiny_qwen2vl_dir):
    groups = {
        ".".join(key.split(".")[:2]) if not key.startswith("lm_head") else "lm_head" for key in _keys(tiny_qwen2vl_dir)
    }
    assert RELEASED_GROUPS <= groups, groups
    # neither the 4.52+ nor the 5.x in-memory names leak into the file
    assert not [key for key in _keys(tiny_qwen2vl_dir) if key.startswith(("model.language_model", "model.visual"))]


def test_tied_output_layer_without_lm_head_loads(tiny_qwen2vl_dir, tmp_path):
    """Qwen2-VL-2B-Instruct: tie_word_embeddings true and no lm_head.weight in the files; not 'a missing tensor'."""
    folder = tmp_path / "tied"
    shutil.copytree(tiny_qwen2vl_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(config))
    state = load_file(str(folder / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})

    bundle = load_vlm(folder, dtype=torch.float32)
    embed = bundle.model.get_input_embeddings().weight
    assert bundle.model.get_output_embeddings().weight.data_ptr() == embed.data_ptr()


def test_untied_model_without_lm_head_is_refused(tiny_qwen2vl_dir, tmp_path):
    """The 7B is untied: its output layer missing from the files is a broken download, named as such."""
    folder = tmp_path / "untied"
    shutil.copytree(tiny_qwen2vl_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelFolderError, match=r"lack 1 tensor.*the output layer"):
        load_vlm(folder, dtype=torch.float32)


def test_sharded_released_layout_loads_the_same_weights(tiny_qwen2vl_dir, tmp_path, tiny_vlm):
    """Two shards and a model.safetensors.index.json, as the 7B ships (5 shards): the same tensors load."""
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_qwen2vl_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        save_file({key: state[key] for key in keys}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
        "weight_map": weight_map,
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    bundle = load_vlm(folder, dtype=torch.float32)
    loaded = bundle.model.state_dict()
    reference = tiny_vlm.model.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[key], reference[key]) for key in reference)
