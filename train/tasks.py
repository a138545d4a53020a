"""The proxy task's training items (recipe section 8): what goes into the aligner and what the frozen T5 decoder must
produce, per sample, and how items are padded into batches.

ThinkDiff-LVLM (LvlmTask): a sample's L generated-token states E and ids T from the feature shards; s is drawn from
1..min(L-1, 128), aligner(E[:s]) goes in, T[s:] (decoded with the VLM tokenizer, re-tokenised for T5) is the target.
ThinkDiff-CLIP (ClipTask): an image and its cleaned caption, split at a random word; part 1 follows the aligned image
tokens, part 2 is the target. Every random draw of an item depends only on (seed, epoch, position), so any process,
and any resumed run, makes the same item; `lengths` gives an item's token counts without reading features or images,
for the sampler's length bucketing.
"""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import torch

from thinkdiff_core.errors import FeatureError
from thinkdiff_core.vision import preprocess_images
from thinkdiff_train.config import Config, ConfigError
from thinkdiff_train.data import FeatureShards, list_samples, read_image_caption

CAPTION_PUNCTUATION = '.!"()*#:;~'  # replaced by spaces when cleaning captions (recipe section 8)
IGNORE_INDEX = -100  # label of padded target positions (transformers' convention)

Item = tuple[int | str, int]  # (epoch, position); the held-out set's epoch is "val"


def draw_split(length: int, rng: random.Random, max_prefix_tokens: int = 128) -> int:
    """Prefix length s, uniform in 1..min(L-1, max_prefix_tokens): states [0, s) go in, tokens [s, L) are the target.

    L = 1 has no proper split; the official code crashes on it (recipe section 11.6). Here s = 1: the one state goes
    in and the target is empty (only </s>), i.e. "the answer ends here", which is what the VLM did.
    """
    if length < 1:
        raise FeatureError("a sample with no generated tokens cannot be trained on; re-extract its shard.")
    return rng.randint(1, max(1, min(length - 1, max_prefix_tokens)))


def clean_caption(caption: str, max_words: int = 50) -> str:
    """Lower-case, the characters . ! " ( ) * # : ; ~ replaced by spaces, at most max_words words."""
    caption = caption.lower()
    for character in CAPTION_PUNCTUATION:
        caption = caption.replace(character, " ")
    return " ".join(caption.split()[:max_words])


def split_caption(caption: str, rng: random.Random) -> tuple[str, str]:
    """(part 1, part 2) split at a word boundary drawn from 1..n-1; a one-word caption gives an empty part 1."""
    words = caption.split()
    if len(words) < 2:
        return "", caption
    cut = rng.randint(1, len(words) - 1)
    return " ".join(words[:cut]), " ".join(words[cut:])


def t5_token_ids(tokenizer, text: str, max_tokens: int) -> list[int]:
    """T5 ids of `text`, truncated to max_tokens - 1, then </s> (appended by hand, so any tokenizer works)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids[: max_tokens - 1]
    return ids + [tokenizer.eos_token_id]


def t5_target_lengths(tokenizer, texts: list[str], max_tokens: int) -> list[int]:
    """len(t5_token_ids(tokenizer, text, max_tokens)) of each text, tokenised in one batch call."""
    if not texts:
        return []
    return [min(len(ids), max_tokens - 1) + 1 for ids in tokenizer(texts, add_special_tokens=False).input_ids]


def sample_rng(seed: int, epoch: int | str, position: int) -> random.Random:
    """The random draws of one sample depend only on (seed, epoch, position): the same on every process and resume."""
    return random.Random(f"{seed}/{epoch}/{position}")


class LvlmTask(torch.utils.data.Dataset):
    """Training items of ThinkDiff-LVLM from extracted feature shards. An item is (epoch, position)."""

    def __init__(
        self, shards: FeatureShards, positions: list[int], vlm_tokenizer, t5_tokenizer, config: Config
    ) -> None:
        self.shards, self.positions, self.config = shards, positions, config
        self.vlm_tokenizer, self.t5_tokenizer = vlm_tokenizer, t5_tokenizer

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, item: Item) -> dict:
        epoch, position = item
        config = self.config
        sample = self.shards[self.positions[position]]
        prefix_tokens, target_ids = self.split(sample["token_ids"], epoch, position)
        if config.feature_source == "input":
            # Ablation (inferred setup): the prompt's own states go in, the whole answer is the target. The FIRST
            # max_input_tokens states, as the official collater truncates its inputs (the image tokens come first).
            features = sample["prompt_features"][: config.max_input_tokens]
        else:
            features = sample["features"][:prefix_tokens]
        text = self.vlm_tokenizer.decode(target_ids.tolist(), skip_special_tokens=True)
        return {
            "features": features,
            "target_ids": t5_token_ids(self.t5_tokenizer, text, config.max_target_tokens),
            "skipped": 0,
        }

    def split(self, token_ids: torch.Tensor, epoch: int | str, position: int) -> tuple[int, torch.Tensor]:
        """(how many generated states go in, the token ids to predict) of one item."""
        config = self.config
        if config.feature_source == "input" or not config.split:
            return len(token_ids), token_ids  # ablations: the whole answer is the target
        s = draw_split(len(token_ids), sample_rng(config.seed, epoch, position), config.max_prefix_tokens)
        return s, token_ids[s:]

    def lengths(self, items: list[Item]) -> list[tuple[int, int]]:
        """(encoder tokens, target tokens) of each item exactly as __getitem__ makes it, from the token ids and the
        seeded split alone: no feature is read. For length bucketing."""
        config = self.config
        encoder_tokens, target_ids = [], []
        for epoch, position in items:
            index = self.positions[position]
            prefix_tokens, target = self.split(self.shards.token_ids(index), epoch, position)
            if config.feature_source == "input":
                prefix_tokens = min(self.shards.num_prompt_states(index), config.max_input_tokens)
            encoder_tokens.append(prefix_tokens)
            target_ids.append(target.tolist())
        texts = self.vlm_tokenizer.batch_decode(target_ids, skip_special_tokens=True)
        return list(zip(encoder_tokens, t5_target_lengths(self.t5_tokenizer, texts, config.max_target_tokens)))


class ClipTask(torch.utils.data.Dataset):
    """Training items of ThinkDiff-CLIP from image + caption pairs. An item is (epoch, position)."""

    def __init__(self, samples: list, t5_tokenizer, config: Config, image_size: int, image_tokens: int) -> None:
        self.samples, self.t5_tokenizer, self.config, self.image_size = samples, t5_tokenizer, config, image_size
        self.image_tokens = image_tokens  # aligned image tokens per sample (65 for the recipe), never padded

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: Item) -> dict:
        epoch, position = item
        config = self.config
        image, caption, _, skipped = read_image_caption(self.samples, position)  # unreadable: the next one, counted
        part1, part2 = split_caption(
            clean_caption(caption, config.caption_max_words), sample_rng(config.seed, epoch, position)
        )
        return {
            "pixel_values": preprocess_images([image], self.image_size)[0],
            "prompt_ids": t5_token_ids(self.t5_tokenizer, part1, config.clip_text_tokens),
            "target_ids": t5_token_ids(self.t5_tokenizer, part2, config.clip_text_tokens),
            "skipped": skipped,
        }

    def lengths(self, items: list[Item]) -> list[tuple[int, int]]:
        """(encoder tokens, target tokens) of each item from its caption alone: no image is read. For an unreadable
        image __getitem__ takes the next sample's caption, so its lengths are off, which only costs a little padding."""
        config = self.config
        parts = [
            split_caption(
                clean_caption(self.samples[position].caption, config.caption_max_words),
                sample_rng(config.seed, epoch, position),
            )
            for epoch, position in items
        ]
        prompt_tokens = t5_target_lengths(self.t5_tokenizer, [first for first, _ in parts], config.clip_text_tokens)
        target_tokens = t5_target_lengths(self.t5_tokenizer, [second for _, second in parts], config.clip_text_tokens)
        return [(self.image_tokens + prompt, target) for prompt, target in zip(prompt_tokens, target_tokens)]


def build_tasks(config: Config, t5_tokenizer, vision) -> tuple[LvlmTask | ClipTask, LvlmTask | ClipTask, int, str]:
    """(training set, held-out set, aligner input width, source model name) for the config's variant."""
    if config.variant == "lvlm":
        from transformers import AutoTokenizer

        shards = FeatureShards(config.features_dir)
        if config.feature_source == "input" and not shards.has_prompt_states:
            raise ConfigError(
                "feature_source='input' needs prompt-token states: re-run extract_features.py with --set keep_prompt_states=true."
            )
        # The VLM's tokenizer turns the stored token ids back into the text T5 re-tokenises.
        vlm_tokenizer = AutoTokenizer.from_pretrained(config.vlm_path, local_files_only=True)
        train_positions, val_positions = hold_out(list(range(len(shards))), config.val_samples)
        make = partial(LvlmTask, shards, vlm_tokenizer=vlm_tokenizer, t5_tokenizer=t5_tokenizer, config=config)
        source_model = shards.shards[0][1].get("vlm") or Path(config.vlm_path).name
        return make(train_positions), make(val_positions), shards.width, source_model
    samples = list_samples(config.train_data)
    if config.val_data:
        train_samples, val_samples = samples, list_samples(config.val_data)
    else:
        train_samples, val_samples = hold_out(samples, config.val_samples)
    image_size = vision.config.image_size
    grid = image_size // vision.config.patch_size // config.vision_downsample_factor
    make = partial(ClipTask, t5_tokenizer=t5_tokenizer, config=config, image_size=image_size, image_tokens=1 + grid**2)
    return make(train_samples), make(val_samples), vision.config.hidden_size, Path(config.vision_path).name


def hold_out(items: list, count: int) -> tuple[list, list]:
    """The last `count` items (at most half) are held out for validation; the rest train."""
    count = min(count, len(items) // 2)
    if count == 0:
        raise ConfigError(
            f"only {len(items)} sample(s): too few to hold any out for validation. Add data or set val_data."
        )
    return items[:-count], items[-count:]


# --- batches ----------------------------------------------------------------------------------------------------


def collate(items: list[dict], pad_id: int, pad_to_multiple: int = 1) -> dict:
    """Right-pad a list of items into a batch, lengths rounded up to a multiple of pad_to_multiple. Masks mark real
    positions, labels use -100 for padding, target_positions are the flat indices of the real target tokens (found
    here on the CPU, so picking them out on the GPU needs no synchronisation)."""
    pad = partial(pad_batch, multiple=pad_to_multiple)
    labels = pad([torch.tensor(i["target_ids"]) for i in items], value=IGNORE_INDEX)
    batch = {
        "labels": labels,
        "target_positions": (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1),
        "skipped": torch.tensor(sum(i["skipped"] for i in items)),
    }
    if "features" in items[0]:
        batch["features"] = pad([i["features"] for i in items])  # zero-padded, (B, S, width)
        batch["feature_mask"] = pad([torch.ones(len(i["features"]), dtype=torch.long) for i in items])
    else:
        batch["pixel_values"] = torch.stack([i["pixel_values"] for i in items])
        batch["prompt_ids"] = pad([torch.tensor(i["prompt_ids"]) for i in items], value=pad_id)
        batch["prompt_mask"] = pad([torch.ones(len(i["prompt_ids"]), dtype=torch.long) for i in items])
    return batch


def pad_batch(sequences: list[torch.Tensor], multiple: int = 1, value: float = 0) -> torch.Tensor:
    """(batch, length, ...) right-padded with `value`; length = the longest sequence rounded up to `multiple`."""
    length = -(-max(len(sequence) for sequence in sequences) // multiple) * multiple
    out = sequences[0].new_full((len(sequences), length, *sequences[0].shape[1:]), value)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = sequence
    return out


def batch_counts(batch: dict, image_tokens: int = 0) -> torch.Tensor:
    """(skipped images, real encoder tokens, encoder token slots, real target tokens, target slots) of a batch still
    on the CPU: counting it never waits for the GPU. CLIP's image tokens (`image_tokens` per sample) are all real."""
    labels = batch["labels"]
    mask = batch["feature_mask"] if "feature_mask" in batch else batch["prompt_mask"]
    images = image_tokens * len(labels)
    counts = [int(batch["skipped"]), int(mask.sum()) + images, mask.numel() + images]
    return torch.tensor([*counts, len(batch["target_positions"]), labels.numel()])


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}  # pinned: asynchronous
