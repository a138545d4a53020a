"""A procedurally drawn mini CoBSAT theme, so the run -> judge -> report loop works offline.

STAND-IN DATA: the Color theme's layout (`color_{object}/{color}_{object}.jpg`) with every one of the 10 CoBSAT colours
and 10 objects, each object drawn as a simple flat shape (a car is a wide bar, a ball a circle, ...) on a grey
background. That keeps the benchmark's own prompt list usable unchanged for tasks 1 and 2 (Color-I, Color-II), and
lets a plain pixel-statistics judge read both the colour and the "object" (shape) back. It says nothing about how
ThinkDiff does on the real CoBSAT images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .benchmark import ITEMS, TASKS

MINI_TASK_IDS = (1, 2)  # the Color theme only
BACKGROUND = (128, 128, 128)
# RGB of each CoBSAT colour (CSS names), in the benchmark's option order.
PALETTE: dict[str, tuple[int, int, int]] = {
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "red": (255, 0, 0),
    "purple": (128, 0, 128),
    "pink": (255, 192, 203),
    "orange": (255, 165, 0),
    "green": (0, 128, 0),
    "brown": (139, 69, 19),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
}
# The shape that stands in for each CoBSAT object.
SHAPES: dict[str, str] = {
    "leaf": "ellipse",
    "hat": "triangle",
    "cup": "tall bar",
    "chair": "L",
    "car": "wide bar",
    "box": "square",
    "book": "plus",
    "ball": "circle",
    "bag": "inverted triangle",
    "apple": "diamond",
}
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background above which a pixel belongs to the shape
MASK_SIZE = 24


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, size: int, fill) -> None:
    """Draw one of the SHAPES' values filling the middle of a size x size canvas."""
    low, high, mid = size * 0.2, size * 0.8, size * 0.5
    third = (high - low) / 3
    if shape == "ellipse":
        draw.ellipse((low, size * 0.32, high, size * 0.68), fill=fill)
    elif shape == "triangle":
        draw.polygon([(mid, low), (high, high), (low, high)], fill=fill)
    elif shape == "inverted triangle":
        draw.polygon([(low, low), (high, low), (mid, high)], fill=fill)
    elif shape == "tall bar":
        draw.rectangle((size * 0.38, low, size * 0.62, high), fill=fill)
    elif shape == "wide bar":
        draw.rectangle((low, size * 0.38, high, size * 0.62), fill=fill)
    elif shape == "square":
        draw.rectangle((low, low, high, high), fill=fill)
    elif shape == "circle":
        draw.ellipse((low, low, high, high), fill=fill)
    elif shape == "diamond":
        draw.polygon([(mid, low), (high, mid), (mid, high), (low, mid)], fill=fill)
    elif shape == "plus":
        draw.rectangle((low + third, low, low + 2 * third, high), fill=fill)
        draw.rectangle((low, low + third, high, low + 2 * third), fill=fill)
    elif shape == "L":
        draw.rectangle((low, low, low + third, high), fill=fill)
        draw.rectangle((low, high - third, high, high), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def draw_mini_image(color: str, obj: str, size: int = 32) -> Image.Image:
    """The mini theme's picture of a `color` `obj` (a flat shape on grey)."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw_shape(ImageDraw.Draw(image), SHAPES[obj], size, PALETTE[color])
    return image


def make_mini(root: str | Path, size: int = 32) -> Path:
    """Write all 100 images of the mini Color theme under `root` (skipping those already there); return root."""
    root = Path(root)
    task = TASKS[1]
    for obj in ITEMS["object"]:
        for color in ITEMS["color"]:
            path = root / task.image_path(color, obj)
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            draw_mini_image(color, obj, size).save(path, quality=95)
    return root


# --- reading the pictures back (the pixel judge) -----------------------------------------------------------------


def foreground_mask(image: Image.Image, size: int = MASK_SIZE) -> np.ndarray:
    """(size, size) bool: pixels far from the grey background."""
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.linalg.norm(pixels - np.array(BACKGROUND, dtype=np.float32), axis=-1) > FOREGROUND_DISTANCE


def dominant_color(image: Image.Image) -> str | None:
    """The palette colour nearest to the median foreground pixel; None when the image has (almost) no foreground."""
    pixels = np.asarray(image.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32).reshape(
        -1, 3
    )
    foreground = pixels[np.linalg.norm(pixels - np.array(BACKGROUND, dtype=np.float32), axis=-1) > FOREGROUND_DISTANCE]
    if len(foreground) < 0.02 * len(pixels):
        return None
    median = np.median(foreground, axis=0)
    names = list(PALETTE)
    distances = [np.linalg.norm(median - np.array(PALETTE[name], dtype=np.float32)) for name in names]
    return names[int(np.argmin(distances))]


def _shape_templates() -> dict[str, np.ndarray]:
    return {obj: foreground_mask(draw_mini_image("black", obj, 96)) for obj in SHAPES}


_TEMPLATES: dict[str, np.ndarray] = {}


def dominant_shape(image: Image.Image) -> str | None:
    """The object whose shape template overlaps the foreground best (intersection over union); None if empty."""
    if not _TEMPLATES:
        _TEMPLATES.update(_shape_templates())
    mask = foreground_mask(image)
    if not mask.any():
        return None
    scores = {obj: (mask & template).sum() / (mask | template).sum() for obj, template in _TEMPLATES.items()}
    return max(scores, key=scores.get)
