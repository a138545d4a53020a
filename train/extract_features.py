"""Precompute ThinkDiff-LVLM training features: run the VLM over an image dataset and store, per image, the final-norm
states of the tokens it generates, the token ids and the text (recipe sections 4-6).

Each image gets one of INSTRUCTIONS at random (the dataset caption is not shown to the VLM), and the VLM samples an
answer with temperature 0.6, top-p 0.9, top-k off, at most 256 tokens, stopping at its end-of-turn token.

    # one GPU
    python train/extract_features.py --config train/configs/lvlm.yaml
    # N GPUs (or several machines, see train/README.md): shards are dealt out round robin
    accelerate launch --multi_gpu --num_processes N train/extract_features.py --config train/configs/lvlm.yaml
    # the tiny CPU run
    python train/extract_features.py --config train/configs/tiny.yaml

Resumable: finished shards are skipped; a shard interrupted half-way is redone from its start. Shard k always holds
source samples [k * samples_per_shard, (k + 1) * samples_per_shard), and instructions and sampling seeds depend only on
the seed and the sample/shard numbers, so a resumed run writes what an uninterrupted one would have.

Speed: on a GPU the batches decode with the fast engine (thinkdiff_core/fast_decode.py: static KV cache, compiled
layers, one CUDA graph per step); `--engine generate` uses transformers' generate instead. The two engines draw
different (equally valid) samples for a seed, so finish a run with the engine it started with.
bench/bench_extract.py measures the throughput.
"""

from __future__ import annotations

import sys

try:  # the first import of the project: where the checkout is not installed, say how to install it
    import thinkdiff_train  # noqa: F401
except ModuleNotFoundError:
    sys.exit(
        f"error: the checkout is not installed in {sys.executable}: run `pip install -e .` in it, or use its .venv"
    )

import argparse
import hashlib
import logging
import random
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from thinkdiff_core.dtypes import torch_dtype
from thinkdiff_core.errors import ChangedSettingsError, report_cli_error
from thinkdiff_core.files import is_temp_name
from thinkdiff_core.generation import GenerationSettings
from thinkdiff_core.prompts import chat_messages, image_part, text_part
from thinkdiff_core.vlm import encode_with_vlm
from thinkdiff_core.vlm_loader import ENGINES, load_vlm
from thinkdiff_train.config import Config, ConfigError, load_config
from thinkdiff_train.data import list_samples, load_image, read_shard_info, shard_is_complete, write_feature_shard

logger = logging.getLogger("thinkdiff.extract")

# Our own instructions, in the spirit of the official 16 (recipe section 6): half ask for a description, half for a
# text-to-image prompt.
INSTRUCTIONS = (
    "Describe the image concisely.",
    "Describe this image in detail.",
    "What is shown in this picture? Answer in one or two sentences.",
    "Give a short caption for this image.",
    "Describe the main subject of the image and its surroundings.",
    "Explain what you see in the image, including colours and composition.",
    "Write a brief description of the scene in this photo.",
    "Summarise the content of this image.",
    "Generate a prompt that can recreate the image in a 2D diffusion model.",
    "Write a diffusion prompt for this image.",
    "Write a text-to-image prompt that would produce a picture like this one.",
    "Create a detailed prompt for an image generator to reproduce this image.",
    "Describe this image as a prompt for a diffusion model, with its style and lighting.",
    "Write a prompt for Stable Diffusion that captures this image.",
    "Turn this image into a short prompt for an image generation model.",
    "Give a comma-separated list of keywords that an image generator could use to recreate this picture.",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML config (train/configs/*.yaml)")
    parser.add_argument("--features-dir", default=None, help="where to write the shards (overrides features_dir)")
    parser.add_argument(
        "--max-shards", type=int, default=None, help="stop after this many shards in total (for trials)"
    )
    parser.add_argument(
        "--engine", choices=ENGINES, default="auto", help="decode engine (auto: the fast engine on a GPU, see above)"
    )
    parser.add_argument(
        "--allow-changed-settings",
        action="store_true",
        help="continue a features folder although sampling settings differ (never samples_per_shard)",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    return parser.parse_args(argv)


def derived_seed(*parts: object) -> int:
    """A 31-bit seed from the run seed and sample/shard numbers: independent of process count and of resumes."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "big") >> 1


def generation_settings(config: Config, shard: int, batch_number: int) -> GenerationSettings:
    """Recipe section 5 (training precompute): temperature 0.6, top-p 0.9, top-k off, at most 256 tokens, stop at EOS.
    The sampling seed is derived from the shard and batch, so a redone shard samples the same tokens."""
    return GenerationSettings(
        num_tokens=config.max_new_tokens,
        stop_at_eos=True,
        temperature=config.temperature,
        top_p=config.top_p,
        seed=derived_seed(config.seed, "sampling", shard, batch_number),
    )


def leading_padding(prompt_ids: torch.Tensor, pad_id: int | None) -> int:
    """Number of left-padding positions of one prompt row (batched prompts are left-padded, see vlm.prepare_inputs)."""
    if pad_id is None:
        return 0
    not_pad = (prompt_ids != pad_id).nonzero()
    return int(not_pad[0]) if len(not_pad) else len(prompt_ids)


def extract_shard(vlm, samples, shard: int, config: Config) -> tuple[list[dict], list[dict]]:
    """Run the VLM over one shard's samples in batches; return (records, skipped)."""
    first = shard * config.samples_per_shard
    indices = range(first, min(first + config.samples_per_shard, len(samples)))
    records, skipped = [], []
    feature_dtype = torch_dtype(config.feature_dtype)
    pad_id = vlm.processor.tokenizer.pad_token_id
    for batch_number, start in enumerate(range(indices.start, indices.stop, config.extract_batch_size)):
        batch = []
        for index in range(start, min(start + config.extract_batch_size, indices.stop)):
            sample = samples[index]
            try:  # an unreadable image is recorded and skipped, never fatal
                image = load_image(sample)
            except (OSError, ValueError, SyntaxError) as error:
                logger.warning("skipping unreadable image %s (%s: %s)", sample.key, type(error).__name__, error)
                skipped.append({"index": index, "key": sample.key, "reason": f"{type(error).__name__}: {error}"})
                continue
            instruction = random.Random(derived_seed(config.seed, "instruction", index)).choice(INSTRUCTIONS)
            batch.append(
                {
                    "index": index,
                    "key": sample.key,
                    "caption": sample.caption,
                    "instruction": instruction,
                    "image": image,
                }
            )
        if not batch:
            continue
        conversations = [chat_messages([image_part(item["image"]), text_part(item["instruction"])]) for item in batch]
        out = encode_with_vlm(
            vlm,
            conversations,
            generation_settings(config, shard, batch_number),
            keep_prompt_states=config.keep_prompt_states,
        )
        for row, item in enumerate(batch):
            length = int(out.lengths[row])
            record = {key: item[key] for key in ("index", "key", "caption", "instruction")}
            record.update(
                text=out.text[row],
                length=length,
                features=out.hidden_states[row, :length].to("cpu", feature_dtype),
                token_ids=out.generated_ids[row, :length].cpu(),
            )
            if config.keep_prompt_states:
                padding = leading_padding(out.prompt_ids[row], pad_id)
                record["prompt_features"] = out.prompt_states[row, padding:].to("cpu", feature_dtype)
            records.append(record)
    return records, skipped


# Settings a features folder records in every shard's JSON and a continued extraction must share: another value
# would mix samples drawn differently (or, for samples_per_shard, put samples in two shards).
EXTRACTION_KEYS = (
    "samples_per_shard",
    "seed",
    "max_new_tokens",
    "temperature",
    "top_p",
    "feature_dtype",
    "keep_prompt_states",
    "max_image_pixels",
    "frozen_dtype",
)


def extraction_settings(config: Config) -> dict:
    return {key: getattr(config, key) for key in EXTRACTION_KEYS}


def check_same_extraction(features_dir: Path, config: Config, allow: bool) -> None:
    """Refuse to continue a features folder whose finished shards were made with other settings, naming the keys.
    samples_per_shard is refused even with `allow`: shard k holds samples [k * n, (k + 1) * n), so another n would
    write some samples a second time. Leftover temp files of a killed run are removed, with a message."""
    if not features_dir.is_dir():
        return
    for leftover in sorted(path for path in features_dir.iterdir() if is_temp_name(path.name)):
        logger.warning("removing %s, left by an interrupted extraction", leftover)
        leftover.unlink(missing_ok=True)
    wanted = extraction_settings(config)
    for sidecar in sorted(features_dir.glob("shard-*.json")):
        info = read_shard_info(sidecar)
        if not info or not info.get("complete"):
            continue
        saved = dict(info.get("settings", {}))
        if "first_index" in info and info.get("shard"):  # shards written before settings were recorded
            saved.setdefault("samples_per_shard", info["first_index"] // info["shard"])
        for key in ("seed", "max_new_tokens", "temperature", "top_p"):
            if key in info:
                saved.setdefault(key, info[key])
        differing = {key: (saved[key], wanted[key]) for key in wanted if key in saved and saved[key] != wanted[key]}
        if not differing:
            continue
        listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in differing.items())
        if "samples_per_shard" in differing:
            raise ChangedSettingsError(
                f"'{features_dir}' holds shards made with other settings ({listed}, in {sidecar.name}); another "
                f"samples_per_shard would put samples in two shards. Set samples_per_shard back to "
                f"{saved['samples_per_shard']}, or extract into a new features_dir."
            )
        if not allow:
            raise ChangedSettingsError(
                f"'{features_dir}' holds shards made with other settings ({listed}, in {sidecar.name}); the rest "
                f"would be drawn differently. Set them back, use a new features_dir, or pass "
                f"--allow-changed-settings to mix them on purpose."
            )
        logger.warning("continuing %s with changed settings (%s), as asked", features_dir, listed)
        return


def extract(
    config: Config, max_shards: int | None = None, engine: str = "auto", allow_changed_settings: bool = False
) -> Path:
    """Write the feature shards of `config` that are not finished yet (this process's share of them); return
    features_dir. max_shards: stop after this many shards in total, for trials. A features folder begun with other
    sampling settings is refused (check_same_extraction) unless allow_changed_settings."""
    if not config.features_dir:
        raise ConfigError("features_dir is empty: set it in the config or pass --features-dir DIR.")
    if not config.vlm_path:
        raise ConfigError("vlm_path is empty: set it to a local Qwen2-VL-7B-Instruct folder (see train/README.md).")
    state = PartialState()
    logging.basicConfig(
        level=logging.INFO if state.is_main_process else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    features_dir = Path(config.features_dir)
    if state.is_main_process:
        check_same_extraction(features_dir, config, allow_changed_settings)

    samples = list_samples(config.train_data)
    num_shards = -(-len(samples) // config.samples_per_shard)
    if max_shards is not None:
        num_shards = min(num_shards, max_shards)
    todo = [shard for shard in range(num_shards) if not shard_is_complete(features_dir, shard)]
    mine = todo[state.process_index :: state.num_processes]  # round robin over processes
    logger.info(
        "%d samples, %d shards, %d finished, %d to do on %d process(es)",
        len(samples),
        num_shards,
        num_shards - len(todo),
        len(todo),
        state.num_processes,
    )

    vlm = load_vlm(
        config.vlm_path,
        dtype=torch_dtype(config.frozen_dtype),
        device=state.device,
        max_image_pixels=config.max_image_pixels,
        engine=engine,
    )

    info = {
        "vlm": vlm.source_model,
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "seed": config.seed,
        "settings": extraction_settings(config),
    }
    total_skipped = 0
    for shard in tqdm(mine, desc=f"shards (process {state.process_index})", disable=not state.is_local_main_process):
        records, skipped = extract_shard(vlm, samples, shard, config)
        write_feature_shard(
            features_dir, shard, records, {**info, "first_index": shard * config.samples_per_shard, "skipped": skipped}
        )
        total_skipped += len(skipped)
    state.wait_for_everyone()
    if total_skipped:
        logger.warning(
            "process %d skipped %d unreadable image(s); they are listed in the shards' JSON",
            state.process_index,
            total_skipped,
        )
    logger.info("features in %s", features_dir)
    return features_dir


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 once the shards are written; a ThinkDiffError (a config or data problem the user can fix)
    prints one line saying what to do, and gives 2."""
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides, features_dir=args.features_dir)
        extract(config, args.max_shards, args.engine, args.allow_changed_settings)
    except Exception as error:  # a ThinkDiffError names its fix; a library's error is translated, no traceback
        return report_cli_error(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
