"""train/extract_features.py on the tiny Qwen2-VL: shard contents, skipping bad images, resuming an interrupted run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from thinkdiff_train import extract_features
from thinkdiff_train.data import FeatureShards


def read_shards(directory):
    out = {}
    for sidecar in sorted(directory.glob("shard-*.json")):
        info = json.loads(sidecar.read_text())
        out[sidecar.stem] = (info, load_file(sidecar.with_suffix(".safetensors")))
    return out


def test_shards_hold_every_readable_sample_once(tiny_features):
    shards = read_shards(tiny_features)
    assert list(shards) == ["shard-000000", "shard-000001", "shard-000002"]  # 21 source samples, 8 per shard
    indices = [s["index"] for info, _ in shards.values() for s in info["samples"]]
    skipped = [s["key"] for info, _ in shards.values() for s in info["skipped"]]
    assert skipped == ["train-000/corrupt0"]  # the truncated picture is recorded, not fatal
    assert sorted(indices) == indices and len(indices) == 20 and len(set(indices)) == 20
    for info, tensors in shards.values():
        lengths = [s["length"] for s in info["samples"]]
        assert tensors["offsets"].tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
        assert tensors["features"].shape == (sum(lengths), 64) and all(1 <= n <= 12 for n in lengths)
        assert tensors["prompt_features"].shape[1] == 64
        assert all(s["instruction"] in extract_features.INSTRUCTIONS for s in info["samples"])
    sample = FeatureShards(tiny_features)[0]
    assert (
        sample["features"].shape[0] == sample["token_ids"].shape[0] == shards["shard-000000"][0]["samples"][0]["length"]
    )


def test_interrupted_extraction_resumes_without_duplicates_or_gaps(
    tiny_train_data, tiny_features, tmp_path, monkeypatch
):
    argv = ["--config", "train/configs/tiny.yaml", "--features-dir", str(tmp_path), *tiny_overrides(tiny_train_data)]
    real_write = extract_features.write_feature_shard

    def killed_during_second_shard(directory, shard, records, info):
        if shard == 1:  # a half-written tensor file and no JSON: what a kill in the middle of the shard leaves
            (directory / "shard-000001.safetensors").write_bytes(b"partial")
            raise KeyboardInterrupt
        real_write(directory, shard, records, info)

    monkeypatch.setattr(extract_features, "write_feature_shard", killed_during_second_shard)
    with pytest.raises(KeyboardInterrupt):
        extract_features.main(argv)
    assert [p.name for p in sorted(tmp_path.glob("*.json"))] == ["shard-000000.json"]
    first_shard_written = (tmp_path / "shard-000000.safetensors").stat().st_mtime_ns

    monkeypatch.setattr(extract_features, "write_feature_shard", real_write)
    assert extract_features.main(argv) == 0
    assert (tmp_path / "shard-000000.safetensors").stat().st_mtime_ns == first_shard_written  # finished: skipped
    resumed, uninterrupted = read_shards(tmp_path), read_shards(tiny_features)
    assert list(resumed) == list(uninterrupted)
    for name, (info, tensors) in uninterrupted.items():
        assert resumed[name][0]["samples"] == info["samples"]  # same samples, instructions and generated text
        for key, value in tensors.items():
            assert torch.equal(resumed[name][1][key], value), (name, key)
    assert not list(tmp_path.glob(".*tmp"))


def test_fast_engine_extraction_writes_the_same_kind_of_shards(tiny_train_data, tmp_path):
    """--engine fast (the GPU default) on CPU: one shard, each sample's features and token ids of one length; the
    prompt-state ablation still lines up."""
    assert extract_features.main(
        ["--config", "train/configs/tiny.yaml", "--engine", "fast", "--max-shards", "1",
         *tiny_overrides(tiny_train_data, features_dir=tmp_path / "fast")]
    ) == 0  # fmt: skip
    shards = read_shards(tmp_path / "fast")
    info, tensors = shards["shard-000000"]
    lengths = [s["length"] for s in info["samples"]]
    assert len(lengths) + len(info["skipped"]) == 8 and all(1 <= n <= 12 for n in lengths)
    assert tensors["features"].shape == (sum(lengths), 64) and tensors["token_ids"].shape == (sum(lengths),)
    assert torch.isfinite(tensors["features"].float()).all()


def test_input_token_ablation_keeps_the_first_prompt_states(tiny_train_data, tiny_features):
    """max_input_tokens truncates as the official collater does: the FIRST states (image tokens, then the
    instruction), not the last."""
    from transformers import AutoTokenizer

    from thinkdiff_train.config import load_config
    from thinkdiff_train.tasks import LvlmTask

    config = load_config(
        "train/configs/tiny.yaml",
        tiny_overrides(tiny_train_data, feature_source="input", max_input_tokens=5)[1::2],
    )
    shards = FeatureShards(tiny_features)
    t5 = AutoTokenizer.from_pretrained(config.t5_path)
    vlm = AutoTokenizer.from_pretrained(config.vlm_path)
    task = LvlmTask(shards, list(range(len(shards))), vlm, t5, config)
    prompt = shards[0]["prompt_features"]
    assert len(prompt) > 5
    item = task[(0, 0)]
    torch.testing.assert_close(item["features"], prompt[:5])
    assert not torch.equal(item["features"], prompt[-5:])
    assert task.lengths([(0, 0)])[0][0] == 5
