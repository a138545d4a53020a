"""Generate CoBSAT outputs in the benchmark's layout, resumable and split across processes.

Layout: {out}/{mode}/shot_{k}/task_{t}/{i}_{theta}_{x_0}_..._{x_k}.jpg with a .json beside it holding text_inputs,
image_inputs and description (what the benchmark's and ThinkDiff's scripts read), plus our run details.

Resume: an image that exists is finished (it is written last, atomically). Split: the full, deterministic list of work
items is dealt out round-robin by process index *before* skipping finished ones, so every process computes the same
list and no item is done twice or missed, whatever finished earlier. Seeds depend on the prompt index, not on the
process, so a split run gives the same images as a single-process one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import PromptError
from ..files import write_atomic
from ..generation import GenerationSettings
from ..prompts import cobsat_content
from .benchmark import CobsatPrompt, prompts, task_by_id

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkItem:
    mode: str
    prompt: CobsatPrompt

    def output_stem(self, out_dir: Path) -> Path:
        return (
            out_dir
            / self.mode
            / f"shot_{self.prompt.shot}"
            / f"task_{self.prompt.task.task_id}"
            / self.prompt.save_name
        )


@dataclass(frozen=True)
class RenderSettings:
    """FLUX settings of the CoBSAT run (recipe section 10: 512x512, 28 steps, guidance 3.5)."""

    size: int = 512
    steps: int = 28
    guidance: float = 3.5
    seed: int = 42


def work_items(
    task_ids: Sequence[int], shots: Sequence[int], modes: Sequence[str], limit: int | None
) -> list[WorkItem]:
    """Every (mode, shot, task, prompt) to generate, in a fixed order."""
    return [
        WorkItem(mode, prompt)
        for mode in modes
        for shot in shots
        for task_id in task_ids
        for prompt in prompts(task_by_id(task_id), shot, limit)
    ]


def split_for_process(count: int, process_index: int, num_processes: int) -> list[int]:
    """Indices 0..count-1 this process handles: round-robin, so the shares differ by at most one item."""
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"process {process_index} of {num_processes} is not a valid split")
    return list(range(process_index, count, num_processes))


def process_rank() -> tuple[int, int, str]:
    """(process_index, num_processes, device) from accelerate's PartialState (1 process when not launched)."""
    import torch
    from accelerate import PartialState

    # Without a GPU, accelerate joins the other processes only when told it runs on the CPU (gloo); on GPUs it uses nccl.
    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    state = PartialState(cpu=use_cpu)
    return state.process_index, state.num_processes, str(state.device)


def check_dataset(data_root: Path, items: Sequence[WorkItem]) -> None:
    """Fail before any model loads if a demo image is missing, saying where the images come from."""
    missing = sorted({path for item in items for path in item.prompt.image_inputs if not (data_root / path).is_file()})
    if missing:
        raise PromptError(
            f"{len(missing)} CoBSAT image(s) are missing under '{data_root}', e.g. '{missing[0]}'. Unzip datasets.zip of "
            f"the Hugging Face dataset yzeng58/CoBSAT there (so that '{data_root}/color_car/red_car.jpg' exists), or "
            f"draw the offline mini theme with `python -m thinkdiff_core.eval.cobsat make-mini {data_root}` (tasks 1, 2)."
        )


def generate_item(
    models, item: WorkItem, data_root: Path, out_dir: Path, settings: GenerationSettings, render: RenderSettings
) -> dict:
    """Generate one output (JSON first, image last) and return the JSON record."""
    from dataclasses import replace

    from ..pipeline import generate

    prompt = item.prompt
    images = [Image.open(data_root / path).convert("RGB") for path in prompt.image_inputs]
    content = cobsat_content(prompt.vlm_words, images)
    seed = render.seed + prompt.index
    result = generate(
        models,
        content,
        mode=item.mode,
        settings=replace(settings, seed=seed),
        steps=render.steps,
        guidance=render.guidance,
        width=render.size,
        height=render.size,
        seed=seed,
        add_vision_id=True,  # the official CoBSAT prompt labels its pictures (recipe section 6)
    )
    record = {
        "text_inputs": prompt.text_inputs,
        "image_inputs": prompt.image_inputs,
        "description": result.text,
        "mode": item.mode,
        "base": models.base.name,
        "task_id": prompt.task.task_id,
        "shot": prompt.shot,
        "index": prompt.index,
        "target": prompt.target,
        "seed": seed,
        "num_tokens": settings.num_tokens,
        "steps": render.steps,
        "guidance": render.guidance,
        "size": render.size,
        "timings_s": {key: round(value, 4) for key, value in result.timings.items()},
    }
    stem = item.output_stem(out_dir)
    write_atomic(stem.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(record, indent=2)))
    write_atomic(stem.with_suffix(".jpg"), lambda tmp: result.image.save(tmp, format="JPEG", quality=95))
    return record


def check_same_base(done: Sequence[WorkItem], out_dir: Path, base: str) -> None:
    """Refuse to resume into an --out whose images another base made (records without a base are flux-dev's)."""
    for item in done:
        record_path = item.output_stem(out_dir).with_suffix(".json")
        try:
            made_with = json.loads(record_path.read_text()).get("base", "flux-dev")
        except (OSError, ValueError):
            continue  # an unreadable record is the runner's resume problem, not a base mismatch
        if made_with != base:
            raise PromptError(
                f"{out_dir} already holds images made with base '{made_with}' ({record_path.name}), not '{base}': "
                f"use one --out per base."
            )


def run(
    models_factory,
    items: Sequence[WorkItem],
    data_root: Path,
    out_dir: Path,
    settings: GenerationSettings,
    render: RenderSettings,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    base: str | None = None,
) -> dict[str, int]:
    """Generate this process's share of `items`, skipping finished ones. models_factory() loads the models, and is
    called only if something is left to do. Returns counts: share, skipped, generated. base: the base model's name;
    finished items made with another base are refused (one --out per base), not counted as done."""
    from tqdm.auto import tqdm

    share = [items[index] for index in split_for_process(len(items), process_index, num_processes)]
    todo = [item for item in share if not item.output_stem(out_dir).with_suffix(".jpg").exists()]
    if base is not None:
        check_same_base([item for item in share if item not in todo], out_dir, base)
    counts = {"share": len(share), "skipped": len(share) - len(todo), "generated": 0}
    if not todo:
        return counts
    models = models_factory()
    bar = tqdm(todo, desc=f"CoBSAT [{process_index + 1}/{num_processes}]", disable=not progress, position=process_index)
    for item in bar:
        generate_item(models, item, data_root, out_dir, settings, render)
        counts["generated"] += 1
    return counts
