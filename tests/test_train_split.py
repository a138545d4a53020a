"""The proxy task's pure parts: the prefix/suffix split, caption handling, LR schedule, data order, config."""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter

import pytest

from thinkdiff_core.errors import FeatureError
from thinkdiff_train.config import Config, ConfigError, load_config
from thinkdiff_train.sampler import StepSampler
from thinkdiff_train.tasks import clean_caption, draw_split, split_caption, t5_token_ids
from thinkdiff_train.train_aligner import get_lr


def draws(length: int, count: int = 4000) -> Counter:
    rng = random.Random(0)
    return Counter(draw_split(length, rng, max_prefix_tokens=128) for _ in range(count))


def test_split_of_a_one_token_sample_does_not_crash():
    # The official code draws from 1..0 and crashes (recipe section 11.6); here the token goes in, the target is empty.
    assert set(draws(1, 50)) == {1}


def test_split_of_two_tokens_is_always_one():
    assert set(draws(2, 50)) == {1}


@pytest.mark.parametrize("length", [129, 130, 256])
def test_split_of_long_samples_is_capped_at_128(length):
    counts = draws(length)
    assert set(counts) == set(range(1, 129))  # every value 1..128 occurs, nothing above
    assert max(counts.values()) < 3 * min(counts.values())  # roughly uniform


def test_split_of_a_medium_sample_leaves_at_least_one_target_token():
    assert set(draws(50)) == set(range(1, 50))


def test_split_of_an_empty_sample_is_an_error():
    with pytest.raises(FeatureError):
        draw_split(0, random.Random(0))


def test_caption_cleaning_and_split():
    assert clean_caption('A "Red" Circle: (big)! On #white~; background.') == "a red circle big on white background"
    assert clean_caption(" ".join(["word"] * 80)).count("word") == 50
    assert split_caption("one", random.Random(0)) == ("", "one")  # a one-word caption gives an empty part 1
    for seed in range(20):
        first, second = split_caption("a b c d", random.Random(seed))
        assert first and second and f"{first} {second}" == "a b c d"


def test_t5_targets_end_with_eos_and_are_capped(tiny_train_data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_train_data / "models" / "t5", local_files_only=True)
    ids = t5_token_ids(tokenizer, "a red circle " * 50, max_tokens=32)
    assert len(ids) == 32 and ids[-1] == tokenizer.eos_token_id
    assert t5_token_ids(tokenizer, "", max_tokens=32) == [tokenizer.eos_token_id]


def test_lr_schedule_is_the_recipes():
    config = Config()
    assert get_lr(0, config) == pytest.approx(1e-6)
    assert get_lr(1000, config) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert get_lr(2000, config) == pytest.approx(1e-4)
    assert get_lr(2000 + 200000, config) == pytest.approx(8e-5)
    assert get_lr(10**7, config) == pytest.approx(8e-5)
    after_warmup = [get_lr(step, config) for step in range(2000, 202000, 5000)]
    assert after_warmup == sorted(after_warmup, reverse=True)


def test_data_order_is_the_same_for_any_split_of_the_global_batch():
    one = list(StepSampler(10, 2, accumulation=2, num_processes=1, process_index=0, seed=3, start_step=0, max_steps=7))
    two = [
        list(StepSampler(10, 2, accumulation=1, num_processes=2, process_index=rank, seed=3, start_step=0, max_steps=7))
        for rank in (0, 1)
    ]
    assert one == [batch for pair in zip(*two) for batch in pair]
    resumed = list(
        StepSampler(10, 2, accumulation=2, num_processes=1, process_index=0, seed=3, start_step=4, max_steps=7)
    )
    assert resumed == one[8:]
    first_epoch = [position for batch in one[:5] for _, position in batch]
    assert sorted(first_epoch) == list(range(10))  # each epoch is a permutation: no sample twice, none missed


def test_config_errors_name_the_problem(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("variant: lvlm\nbatch_sise: 4\n")
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(config_file)
    with pytest.raises(ConfigError, match="not one of"):
        load_config(None, ["variant=llm"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    assert load_config(None, ["learning_rate=1e-4", "train_data=a.tar"]).learning_rate == 1e-4


def test_config_is_frozen_and_checked_on_construction():
    config = load_config(None, ["batch_size=4"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 8
    assert dataclasses.replace(config, batch_size=8).batch_size == 8
    with pytest.raises(ConfigError, match="not one of"):
        dataclasses.replace(config, feature_source="prompt")
    # path lists are tuples however they were given, so a frozen config stays hashable and unchangeable
    assert load_config(None, train_data=("a.tar", "b.tar")).train_data == ("a.tar", "b.tar")
    assert Config(train_data=["a.tar"]).train_data == ("a.tar",) and hash(Config(train_data=["a.tar"]))


def test_shipped_configs_are_found_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no train/configs here: `--config tiny.yaml` still finds the shipped file
    assert load_config("tiny.yaml").variant == "lvlm" and load_config("tiny_clip.yaml").variant == "clip"
    with pytest.raises(ConfigError, match="shipped config: clip.yaml, lvlm.yaml, tiny.yaml, tiny_clip.yaml"):
        load_config("tiny2.yaml")


def test_the_old_key_features_still_works_and_names_its_new_name(tmp_path, caplog):
    """User configs are a public API: `features` (renamed feature_source) in a file or a --set keeps working."""
    config_file = tmp_path / "old.yaml"
    config_file.write_text("variant: lvlm\nfeatures: input\n")
    with caplog.at_level(logging.WARNING, logger="thinkdiff.config"):
        assert load_config(config_file).feature_source == "input"
        assert load_config(None, ["features=input"]).feature_source == "input"
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2 and all("'features' is deprecated" in w and "feature_source" in w for w in warnings)
    assert warnings[0].startswith(str(config_file)) and warnings[1].startswith("--set")
    # the later source wins, whichever name it uses; both names with different values in one place is an error
    assert load_config(config_file, ["feature_source=generated"]).feature_source == "generated"
    assert load_config(None, ["feature_source=generated", "features=input"]).feature_source == "input"
    config_file.write_text("features: input\nfeature_source: generated\n")
    with pytest.raises(ConfigError, match="keep only feature_source"):
        load_config(config_file)
