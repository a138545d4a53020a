"""The pictures of the stand-in runs: plain coloured shapes for the demo's in-context examples and the tiny
training data (train/make_tiny_data.py), with their captions. Re-exported by thinkdiff_core.standin."""

from __future__ import annotations

from PIL import Image, ImageDraw


def draw_shape_image(color: str, shape: str = "square", size: int = 96) -> Image.Image:
    """A plain picture of one coloured shape on white: the demo's and tests' in-context examples."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    else:
        draw.rectangle(box, fill=color)
    return image


# --- training stand-ins (train/make_tiny_data.py and the training tests) -----------------------------------------

SHAPE_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "pink"]
SHAPE_KINDS = ["square", "circle", "triangle"]
SHAPE_BACKGROUNDS = ["white", "grey", "lightblue"]


def shape_caption(color: str, shape: str, background: str = "white") -> str:
    """The caption of a `draw_shape_picture`, in the style of a short image description."""
    return f"A {color} {shape} in the middle of a {background} background."


def draw_shape_picture(color: str, shape: str = "square", background: str = "white", size: int = 64) -> Image.Image:
    """One coloured square, circle or triangle on a plain background (training data for the tiny runs)."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    low, high = size // 5, size - size // 5
    if shape == "circle":
        draw.ellipse((low, low, high, high), fill=color)
    elif shape == "triangle":
        draw.polygon([(size // 2, low), (high, high), (low, high)], fill=color)
    else:
        draw.rectangle((low, low, high, high), fill=color)
    return image
