"""Prompt layouts for the reasoning VLM: the official CoBSAT in-context layout, a free interleaved layout, chat messages.

A layout turns words, text and PIL images into one user turn's content (a list of text and image parts), which
`chat_messages` wraps with the recipe's system message for the processor's chat template (recipe section 6).
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from .errors import PromptError

SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_MARKER = "<image>"
# CoBSAT question used by the official interleaved inference (recipe section 6), quoted verbatim.
COBSAT_QUESTION = (
    "I give you several words and pictures. First, please analyse what the next picture is. Then give me a detailed "
    "diffusion prompt to describe the next picture. Please only provide me the detailed prompt and start the answer "
    "with 'Create an image'."
)
LAYOUTS = ("in-context words", "free text")


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def image_part(image: Image.Image) -> dict:
    return {"type": "image", "image": image}


def cobsat_content(words: Sequence[str], images: Sequence[Image.Image], question: str = COBSAT_QUESTION) -> list[dict]:
    """In-context layout of the official CoBSAT inference (recipe section 6).

    words[k] labels images[k]; the last word is the query and has no image, so len(words) == len(images) + 1.
    Renders: question, "\\n\\n", "Word 1: {w1}, " [image 1], "\\n\\nWord 2: {w2}, " [image 2], ..., "\\n\\nWord n+1: {q}, ".
    """
    words = [word.strip() for word in words]
    if len(words) != len(images) + 1 or any(not word for word in words):
        raise PromptError(
            f"the in-context layout needs one word per image plus a final query word, got {len(words)} non-empty "
            f"word(s) for {len(images)} image(s). Write one word per line (e.g. 'red', 'blue', 'green') and connect "
            f"one image for each word except the last."
        )
    content = [text_part(question + "\n\n")]
    for index, (word, image) in enumerate(zip(words, images), start=1):
        prefix = "" if index == 1 else "\n\n"
        content += [text_part(f"{prefix}Word {index}: {word}, "), image_part(image)]
    content.append(text_part(f"\n\nWord {len(words)}: {words[-1]}, "))
    return content


def interleaved_content(text: str, images: Sequence[Image.Image], marker: str = IMAGE_MARKER) -> list[dict]:
    """Free layout: each `marker` in `text` is replaced by the next image, in order.

    Without any marker the images come first and the text after them, the recipe's single-image layout
    (user content = [image, instruction]).
    """
    pieces = text.split(marker)
    if len(pieces) == 1:
        content = [image_part(image) for image in images]
        if text.strip():
            content.append(text_part(text))
        elif not images:
            raise PromptError("the prompt is empty: write an instruction, connect at least one image, or both.")
        return content
    if len(pieces) - 1 != len(images):
        raise PromptError(
            f"the text has {len(pieces) - 1} '{marker}' marker(s) but {len(images)} image(s) are connected. "
            f"Use one marker per image (they are filled in order image_1, image_2, ...), or no marker at all to put "
            f"every image before the text."
        )
    content = []
    for index, piece in enumerate(pieces):
        if piece:
            content.append(text_part(piece))
        if index < len(images):
            content.append(image_part(images[index]))
    return content


def chat_messages(content: list[dict], system: str = SYSTEM_PROMPT) -> list[dict]:
    """Qwen2-VL chat messages: the recipe's system message and one user turn."""
    return [{"role": "system", "content": [text_part(system)]}, {"role": "user", "content": content}]


def layout_content(layout: str, prompt: str, images: Sequence[Image.Image]) -> list[dict]:
    """User content for a layout name (see LAYOUTS): the encode node's single entry point to the prompt builders.

    "in-context words": one word per line; image k goes with word k; the last word is the query (CoBSAT layout).
    "free text": `<image>` markers in the text are replaced by the images in order (none: images first).
    """
    if layout == "in-context words":
        words = [line for line in prompt.splitlines() if line.strip()]
        return cobsat_content(words, images)
    if layout == "free text":
        return interleaved_content(prompt, images)
    raise PromptError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
