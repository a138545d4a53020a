"""CoBSAT judges: the MLLM judge (official: LLaVA-1.5-13B; or Qwen2-VL), the CLIP ViT-B/32 proxy, and a pixel judge
for the mini theme (protocol sections 6 and 7).

Every judge answers the benchmark's two multiple-choice questions about one image with option numbers 1..10 (or -1):
`attribute` (the theme's detail: colour, background, ...) and `object` (the object or animal). Scoring is the same for
all: a row is correct only if both answers are right.
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from ..errors import ModelFolderError, PromptError
from .benchmark import Task, word

logger = logging.getLogger(__name__)

JUDGES = ("llava", "qwen2vl", "clip", "pixel")
# The official LLaVA fork's "llava_v1" conversation (inferred from run_llava's conv-mode choice for llava-v1.5-13b).
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass
class Verdict:
    """A judge's answers: option numbers (1-based, -1 = unparseable) and anything worth logging."""

    attribute: int
    object: int
    extra: dict = field(default_factory=dict)


class Judge(Protocol):
    name: str

    def judge(self, image: Image.Image, task: Task, truth: tuple[str, str] | None = None) -> Verdict:
        """truth: the expected (attribute, object) raw items; only the CLIP proxy uses it (for logged scores)."""


# --- the MLLM questions and the answer rule ----------------------------------------------------------------------


def questions(task: Task) -> dict[str, str]:
    """The two questions, quoted from the benchmark (protocol section 6), options with item2word applied."""
    prompts = {
        "attribute": f"What is the {task.theme} (of the main object) in this image? Answer from the following options: ",
        "object": "What is the main object in this image? Answer from the following options: ",
    }
    options = {"attribute": task.attribute_items, "object": task.object_items}
    for key in prompts:
        for number, item in enumerate(options[key], start=1):
            prompts[key] += f" ({number}){word(item)}"
        prompts[key] += ". Answer the number only and do not include any other texts (e.g., 1)."
    return prompts


def parse_answer(reply: object) -> int:
    """The benchmark's rule: concatenate every digit of the reply; 1..10 is the answer, anything else -1.

    "3." -> 3, "(3)" -> 3, "The answer is 7" -> 7, "10" -> 10, "3 or 4" -> 34 -> -1, "" -> -1. Never raises: the
    benchmark's own int() of str.isdigit characters fails on digits such as '²' or '①', which here count as the digit
    they show (unicodedata.digit: '①' -> 1, Arabic-Indic '٣' -> 3); a reply that is not text (None) is -1.
    """
    if not isinstance(reply, str):
        return -1
    digits = "".join(str(unicodedata.digit(character)) for character in reply if character.isdigit())
    if not digits:
        return -1
    digits = digits.lstrip("0") or "0"  # as int() reads them; also keeps int() clear of its 4300-digit limit
    if len(digits) > 2:
        return -1
    number = int(digits)
    return number if 1 <= number <= 10 else -1


class MllmJudge:
    """Asks the two questions through `ask(image, question) -> reply` (greedy decoding) and parses the replies."""

    def __init__(self, name: str, ask) -> None:
        self.name = name
        self.ask = ask

    def judge(self, image: Image.Image, task: Task, truth: tuple[str, str] | None = None) -> Verdict:
        replies = {key: self.ask(image, question) for key, question in questions(task).items()}
        return Verdict(
            attribute=parse_answer(replies["attribute"]),
            object=parse_answer(replies["object"]),
            extra={"response_attribute": replies["attribute"], "response_object": replies["object"]},
        )


def llava_asker(path: Path, device: str, dtype: torch.dtype, max_new_tokens: int = 512):
    """LLaVA-1.5 in transformers' format (llava-hf/llava-1.5-13b-hf); temperature 0, one beam, as the benchmark."""
    from ..hf_compat import dtype_kwargs, import_transformers

    transformers = import_transformers()
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        path, local_files_only=True, **dtype_kwargs(dtype)
    )
    model = model.to(device).eval()

    def ask(image: Image.Image, question: str) -> str:
        prompt = f"{LLAVA_V1_SYSTEM} USER: <image>\n{question} ASSISTANT:"
        inputs = processor(images=image.convert("RGB"), text=prompt, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            output = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
        return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    return ask


def qwen2vl_asker(path: Path, device: str, dtype: torch.dtype, max_new_tokens: int = 512):
    """A Qwen2-VL judge (the project's VLM loader), greedy; not the official judge, agreement unmeasured."""
    from ..prompts import chat_messages, image_part, text_part
    from ..vlm import model_inputs
    from ..vlm_loader import load_vlm

    vlm = load_vlm(path, dtype=dtype, device=device)

    def ask(image: Image.Image, question: str) -> str:
        inputs = model_inputs(vlm, [chat_messages([image_part(image), text_part(question)])])
        eos = vlm.model.generation_config.eos_token_id
        with torch.inference_mode():
            output = vlm.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos)
        return vlm.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[
            0
        ].strip()

    return ask


class ClipJudge:
    """The CLIP ViT-B/32 proxy: raw words (no template, no item2word); score = logit_scale * cosine, clipped at 0."""

    name = "clip"

    def __init__(self, path: Path, device: str = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.device = device

    def judge(self, image: Image.Image, task: Task, truth: tuple[str, str] | None = None) -> Verdict:
        attribute, obj = truth or ("", "")
        texts = [attribute, obj, f"{attribute} {obj}", *task.object_items, *task.attribute_items]
        inputs = self.processor(text=texts, images=image.convert("RGB"), return_tensors="pt", padding=True).to(
            self.device
        )
        with torch.inference_mode():
            outputs = self.model(**inputs)
            text_embeds = outputs.text_embeds / outputs.text_embeds.norm(dim=-1, keepdim=True)
            image_embeds = outputs.image_embeds / outputs.image_embeds.norm(dim=-1, keepdim=True)
            scores = (image_embeds @ text_embeds.T)[0] * self.model.logit_scale.exp()
            scores = scores.clamp(min=0).float().cpu()
        count = len(task.object_items)
        return Verdict(
            attribute=int(scores[3 + count :].argmax()) + 1,
            object=int(scores[3 : 3 + count].argmax()) + 1,
            extra={
                "clip_similarity_attribute": float(scores[0]),
                "clip_similarity_object": float(scores[1]),
                "clip_similarity_overall": float(scores[2]),
            },
        )


class PixelJudge:
    """For the mini theme only: reads the colour by pixel statistics and the shape by template overlap."""

    name = "pixel"

    def judge(self, image: Image.Image, task: Task, truth: tuple[str, str] | None = None) -> Verdict:
        from .mini import MINI_TASK_IDS, dominant_color, dominant_shape

        if task.task_id not in MINI_TASK_IDS:
            raise PromptError(
                f"the pixel judge reads only the mini Color theme (tasks 1, 2), not {task.name}; use --judge llava or clip."
            )
        color, shape = dominant_color(image), dominant_shape(image)
        return Verdict(
            attribute=task.attribute_items.index(color) + 1 if color else -1,
            object=task.object_items.index(shape) + 1 if shape else -1,
            extra={"read_color": color or "", "read_shape": shape or ""},
        )


def load_judge(
    name: str,
    path: str | Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_new_tokens: int = 512,
) -> Judge:
    """A judge by name; model judges need `path` (a local folder or cached repo id)."""
    if name == "pixel":
        return PixelJudge()
    if name not in JUDGES:
        raise PromptError(f"unknown judge {name!r}; choose one of {JUDGES}")
    if path is None:
        examples = {
            "llava": "llava-hf/llava-1.5-13b-hf",
            "qwen2vl": "Qwen/Qwen2-VL-7B-Instruct",
            "clip": "openai/clip-vit-base-patch32",
        }
        raise ModelFolderError(
            f"the {name} judge needs --judge-model (a local folder or cached repo id such as {examples[name]})."
        )
    from ..pipeline import resolve_model_folder

    folder = resolve_model_folder(path, f"{name} judge")
    if name == "clip":
        return ClipJudge(folder, device)
    asker = llava_asker if name == "llava" else qwen2vl_asker
    return MllmJudge(name, asker(folder, device, dtype, max_new_tokens))
