"""Data for ThinkDiff training: image + caption sources, and the feature shards written by extract_features.py.

Image + caption sources (any mix):
  - webdataset tar shards: members grouped by key (the name up to the first dot); the image is `key.jpg|jpeg|png|webp`,
    the caption `key.txt`, or `key.json` with a "caption" or "text" field. Read with Python's tarfile, no extra package.
  - a folder of images, each with a same-name `.txt` caption (images without one get an empty caption).
  - a `.jsonl` file of {"image": path, "caption": text} lines (image paths relative to the file's folder).
Images are decoded only when a sample is used. An unreadable image is never fatal: `read_image_caption` skips to the
next sample and reports how many it skipped, so every batch keeps its size (which distributed training needs).

Feature shards (the official precompute stored webdataset tars of pickled tensors; we store no pickles):
  shard-000012.safetensors  features (sum of lengths, width), token_ids (sum of lengths,), offsets (samples + 1,)
                            and, with keep_prompt_states, prompt_features / prompt_offsets
  shard-000012.json         per-sample key, instruction, generated text and length; skipped images; "complete": true
Each file is written to a temporary name and renamed; the JSON goes last, so a shard counts as finished only when its
JSON exists. Shard k always holds samples [k * samples_per_shard, (k + 1) * samples_per_shard) of the source order,
so a redone shard replaces, never duplicates.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from thinkdiff_core.errors import FeatureError, NonFiniteError, ThinkDiffError
from thinkdiff_core.files import write_atomic

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FEATURE_FORMAT = "thinkdiff-features"
FEATURE_FORMAT_VERSION = 1


class DataError(ThinkDiffError):
    """A data source is missing, empty or malformed."""


@dataclass(frozen=True)
class SampleRef:
    """Where one image + caption pair lives. For tar members, `offset`/`size` locate the image bytes in `path`."""

    key: str
    path: str
    caption: str
    offset: int = -1
    size: int = -1


# --- image + caption sources ------------------------------------------------------------------------------------


def expand_sources(patterns: list[str]) -> list[Path]:
    """Paths for a list of files, folders, globs and `{000..123}` numeric ranges (webdataset shard notation)."""
    paths = []
    for pattern in patterns:
        for expanded in _expand_braces(str(pattern)):
            matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
            if not matches or not all(os.path.exists(match) for match in matches):
                raise DataError(
                    f"data source '{expanded}' does not exist. Give webdataset .tar shards, a folder of images with "
                    f".txt captions, or a .jsonl of image paths and captions (see train/README.md)."
                )
            paths += [Path(match) for match in matches]
    return paths


def list_samples(patterns: list[str]) -> list[SampleRef]:
    """Every image + caption pair of the sources, in a fixed order (source order, then name order)."""
    samples: list[SampleRef] = []
    for path in expand_sources(patterns):
        if path.is_dir():
            samples += _folder_samples(path)
        elif path.suffix == ".tar":
            samples += _tar_samples(path)
        elif path.suffix == ".jsonl":
            samples += _jsonl_samples(path)
        else:
            raise DataError(f"'{path}' is not a .tar shard, a .jsonl file or a folder; cannot read images from it.")
    if not samples:
        raise DataError(f"no images found in {patterns}. Images need one of the extensions {IMAGE_EXTENSIONS}.")
    return samples


def load_image(sample: SampleRef) -> Image.Image:
    """Decode a sample's image as RGB; raises OSError (or ValueError) when it is unreadable."""
    if sample.offset >= 0:
        with open(sample.path, "rb") as handle:
            handle.seek(sample.offset)
            data = io.BytesIO(handle.read(sample.size))
        image = Image.open(data)
    else:
        image = Image.open(sample.path)
    image.load()  # decode now, so a truncated file fails here and not later in a worker's collate
    return image.convert("RGB")


def read_image_caption(samples: list[SampleRef], index: int) -> tuple[Image.Image, str, str, int]:
    """(image, caption, key, number of unreadable images skipped) for sample `index`, or the next readable one."""
    for skipped in range(len(samples)):
        sample = samples[(index + skipped) % len(samples)]
        try:
            return load_image(sample), sample.caption, sample.key, skipped
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            logger.warning("skipping unreadable image %s (%s: %s)", sample.key, type(error).__name__, error)
    raise DataError(
        f"none of the {len(samples)} images could be read; check the data sources (see the warnings above)."
    )


def _expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    first, last = match.group(1), match.group(2)
    width = len(first) if first.startswith("0") else 0
    head, tail = pattern[: match.start()], pattern[match.end() :]
    out = []
    for number in range(int(first), int(last) + 1):
        out += _expand_braces(f"{head}{number:0{width}d}{tail}")
    return out


def _folder_samples(folder: Path) -> list[SampleRef]:
    samples = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            caption_file = path.with_suffix(".txt")
            caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
            samples.append(
                SampleRef(key=str(path.relative_to(folder).with_suffix("")), path=str(path), caption=caption)
            )
    return samples


def _jsonl_samples(path: Path) -> list[SampleRef]:
    samples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image = record["image"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataError(
                f"{path}:{number} must be a JSON object with an 'image' path and a 'caption' ({error})."
            ) from error
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        caption = str(record.get("caption", record.get("text", "")))
        samples.append(SampleRef(key=f"{path.stem}/{number}", path=str(image_path), caption=caption))
    return samples


def _tar_samples(path: Path) -> list[SampleRef]:
    images: dict[str, tarfile.TarInfo] = {}
    captions: dict[str, str] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, name = member.name.rpartition("/")
                stem, _, extension = name.partition(".")
                key = f"{directory}/{stem}" if directory else stem
                extension = "." + extension.lower()
                if extension in IMAGE_EXTENSIONS:
                    images[key] = member
                elif extension in (".txt", ".json"):
                    text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                    if extension == ".json":
                        try:
                            record = json.loads(text)
                        except json.JSONDecodeError:
                            continue
                        if not isinstance(record, dict) or key in captions:
                            continue
                        text = str(record.get("caption", record.get("text", "")))
                    captions[key] = text.strip()
    except (tarfile.TarError, OSError) as error:
        raise DataError(f"'{path}' is not a readable tar shard ({error}); re-create or remove it.") from error
    return [
        SampleRef(
            key=f"{path.stem}/{key}",
            path=str(path),
            caption=captions.get(key, ""),
            offset=member.offset_data,
            size=member.size,
        )
        for key, member in images.items()
    ]


# --- feature shards ---------------------------------------------------------------------------------------------


def shard_stem(shard: int) -> str:
    return f"shard-{shard:06d}"


def read_shard_info(sidecar: Path) -> dict | None:
    """A shard's JSON, or None when it is unreadable (torn or damaged: the shard then counts as not finished)."""
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def shard_is_complete(directory: Path, shard: int) -> bool:
    """Finished shards have their JSON (written last, readable and marked complete) and their tensors."""
    stem = shard_stem(shard)
    info = read_shard_info(directory / f"{stem}.json")
    return bool(info and info.get("complete")) and (directory / f"{stem}.safetensors").is_file()


def write_feature_shard(directory: Path, shard: int, records: list[dict], info: dict) -> None:
    """Write one shard atomically: tensors first, then the JSON that marks it complete.

    records: one dict per sample with `features` (length, width), `token_ids` (length,), optional `prompt_features`,
    and JSON-able fields (key, index, instruction, text, caption).
    """
    directory.mkdir(parents=True, exist_ok=True)
    stem = shard_stem(shard)
    tensors = {}
    if records:
        tensors["features"] = torch.cat([r["features"] for r in records]).contiguous()
        tensors["token_ids"] = torch.cat([r["token_ids"] for r in records]).to(torch.int64).contiguous()
        tensors["offsets"] = _offsets([len(r["token_ids"]) for r in records])
        if records[0].get("prompt_features") is not None:
            tensors["prompt_features"] = torch.cat([r["prompt_features"] for r in records]).contiguous()
            tensors["prompt_offsets"] = _offsets([len(r["prompt_features"]) for r in records])
    else:  # every image of the shard was unreadable: keep an empty shard so it is not redone forever
        tensors["offsets"] = torch.zeros(1, dtype=torch.int64)
    meta_records = [{k: v for k, v in r.items() if not isinstance(v, torch.Tensor) and v is not None} for r in records]
    sidecar = {
        "format": FEATURE_FORMAT,
        "version": FEATURE_FORMAT_VERSION,
        "shard": shard,
        "num_samples": len(records),
        **info,
        "samples": meta_records,
        "complete": True,
    }
    write_atomic(directory / f"{stem}.safetensors", lambda tmp: save_file(tensors, tmp))
    write_atomic(directory / f"{stem}.json", lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=1)))


class FeatureShards:
    """Read access to the finished shards of a features directory, as one list of samples in shard order."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise DataError(
                f"features_dir '{self.directory}' is a file, not a folder: set features_dir to the folder "
                f"extract_features.py wrote."
            )
        if not self.directory.is_dir():
            raise DataError(
                f"features folder '{self.directory}' does not exist. Run train/extract_features.py with the same "
                f"config first (it writes features_dir)."
            )
        self.shards: list[tuple[Path, dict]] = []
        unfinished, first_seen = [], {}
        for sidecar in sorted(self.directory.glob("shard-*.json")):
            info = read_shard_info(sidecar)
            if info is None or info.get("format") != FEATURE_FORMAT or not info.get("complete"):
                unfinished.append(sidecar.name)
                continue
            if not sidecar.with_suffix(".safetensors").is_file():
                unfinished.append(sidecar.name)
                continue
            for record in info.get("samples", []):  # each source sample in one shard only
                if "index" in record and first_seen.setdefault(record["index"], sidecar.name) != sidecar.name:
                    raise DataError(
                        f"'{self.directory}': source sample {record['index']} is in both {first_seen[record['index']]} "
                        f"and {sidecar.name}, so training would see it twice (shards written with different "
                        f"samples_per_shard). Extract into a new features_dir."
                    )
            if info["num_samples"]:
                self.shards.append((sidecar.with_suffix(".safetensors"), info))
        if unfinished:
            logger.warning(
                "%s: %d shard(s) are unfinished or unreadable and are not used (%s); rerun extract_features.py to "
                "redo them",
                self.directory,
                len(unfinished),
                ", ".join(unfinished[:5]),
            )
        self.index = [
            (number, row) for number, (_, info) in enumerate(self.shards) for row in range(info["num_samples"])
        ]
        if not self.index:
            raise DataError(
                f"'{self.directory}' holds no finished feature shards. Run train/extract_features.py first."
            )
        self._handles: dict[int, object] = {}
        self._offsets: dict[tuple[int, str], object] = {}  # numpy arrays

    def __len__(self) -> int:
        return len(self.index)

    @property
    def width(self) -> int:
        return self._handle(0).get_slice("features").get_shape()[1]

    @property
    def has_prompt_states(self) -> bool:
        return "prompt_features" in self._handle(0).keys()

    def __getitem__(self, index: int) -> dict:
        """{"features": (L, width) float32, "token_ids": (L,), "text": str, "prompt_features": (P, width) or None}."""
        number, row = self.index[index]
        handle = self._handle(number)
        start, end = self._span(number, row)
        sample = {
            "features": handle.get_slice("features")[start:end].float(),
            "token_ids": handle.get_slice("token_ids")[start:end],
            "text": self.shards[number][1]["samples"][row].get("text", ""),
            "prompt_features": None,
        }
        if sample["features"].shape[0] == 0:
            raise FeatureError(f"{self.shards[number][0].name} row {row} has no features; re-extract that shard.")
        if not torch.isfinite(sample["features"]).all():  # checked here, where they enter: never trained on
            raise NonFiniteError(
                f"{self.shards[number][0].name} row {row} holds NaN/inf features (the VLM overflowed, e.g. in "
                f"float16); delete that shard's .json and .safetensors and rerun extract_features.py with "
                f"frozen_dtype bfloat16 or float32."
            )
        if "prompt_features" in handle.keys():
            prompt_start, prompt_end = self._span(number, row, "prompt_offsets")
            sample["prompt_features"] = handle.get_slice("prompt_features")[prompt_start:prompt_end].float()
            if not torch.isfinite(sample["prompt_features"]).all():
                raise NonFiniteError(
                    f"{self.shards[number][0].name} row {row} holds NaN/inf prompt states; delete that shard and "
                    f"rerun extract_features.py with frozen_dtype bfloat16 or float32."
                )
        return sample

    def token_ids(self, index: int) -> torch.Tensor:
        """The generated token ids of sample `index` (L,), without reading its features (for length bucketing)."""
        number, row = self.index[index]
        start, end = self._span(number, row)
        return self._handle(number).get_slice("token_ids")[start:end]

    def num_prompt_states(self, index: int) -> int:
        """How many prompt-token states sample `index` has (0 without keep_prompt_states)."""
        number, row = self.index[index]
        if "prompt_offsets" not in self._handle(number).keys():
            return 0
        start, end = self._span(number, row, "prompt_offsets")
        return end - start

    def _span(self, number: int, row: int, key: str = "offsets") -> tuple[int, int]:
        if (number, key) not in self._offsets:  # samples_per_shard + 1 ints per shard, read once
            self._offsets[(number, key)] = self._handle(number).get_tensor(key).numpy()  # fast to index
        offsets = self._offsets[(number, key)]
        return int(offsets[row]), int(offsets[row + 1])

    def _handle(self, number: int):
        # One open handle per shard and process (DataLoader workers each open their own after the fork).
        if number not in self._handles:
            try:
                self._handles[number] = safe_open(str(self.shards[number][0]), framework="pt", device="cpu")
            except (SafetensorError, OSError) as error:
                raise DataError(
                    f"feature shard {self.shards[number][0]} is unreadable ({error}); it is truncated or damaged: "
                    f"delete it and its .json and rerun extract_features.py to redo it."
                ) from error
        return self._handles[number]

    def __getstate__(self) -> dict:  # handles do not pickle; workers reopen them
        return {**self.__dict__, "_handles": {}}


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
