"""The example input pictures of the shipped workflows (workflows/input/*.png), drawn with PIL so they need no download.

Written by `python -m workflows.build_workflows` together with the workflows; each picture is deterministic (fixed
sizes and seeds), so regenerating gives the same pixels. The in-context workflows use the two toy cars (word 1: red,
word 2: blue), the style workflow the painting, the compose workflow the sunflower and the vase.
"""

from __future__ import annotations

import math
import random
from typing import Callable

from PIL import Image, ImageDraw, ImageFilter


def draw_toy_car(color: str, size: int = 256) -> Image.Image:
    """A simple drawn toy car (body, cabin, windows, wheels) in `color` on a light background."""
    image = Image.new("RGB", (size, size), (246, 246, 240))
    draw = ImageDraw.Draw(image)
    s = size / 256
    draw.rectangle([0, 196 * s, size, size], fill=(205, 205, 200))  # ground
    draw.rounded_rectangle(
        [28 * s, 118 * s, 228 * s, 182 * s], radius=int(18 * s), fill=color, outline="black", width=max(1, int(3 * s))
    )
    draw.polygon(
        [(72 * s, 120 * s), (96 * s, 78 * s), (168 * s, 78 * s), (194 * s, 120 * s)], fill=color, outline="black"
    )
    draw.polygon([(88 * s, 116 * s), (104 * s, 88 * s), (128 * s, 88 * s), (128 * s, 116 * s)], fill=(190, 225, 245))
    draw.polygon([(136 * s, 116 * s), (136 * s, 88 * s), (162 * s, 88 * s), (180 * s, 116 * s)], fill=(190, 225, 245))
    for center in (76, 180):
        draw.ellipse([(center - 24) * s, 158 * s, (center + 24) * s, 206 * s], fill=(40, 40, 40))
        draw.ellipse([(center - 10) * s, 172 * s, (center + 10) * s, 192 * s], fill=(170, 170, 170))
    draw.rectangle([214 * s, 130 * s, 226 * s, 142 * s], fill=(255, 230, 120))  # headlight
    return image


def draw_style_painting(size: int = 256, seed: int = 7) -> Image.Image:
    """A painting-like picture in a swirling night-sky style: brush-stroke swirls, a glowing moon, stars, hills and
    a dark cypress, in saturated blues and yellows (for the style workflow)."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (20, 40, 110))
    draw = ImageDraw.Draw(image)
    s = size / 256
    blues = [(30, 70, 160), (60, 110, 200), (90, 150, 220), (40, 90, 180), (140, 190, 235), (20, 50, 130)]
    for _ in range(900):  # short curved brush strokes following big swirls
        x, y = rng.uniform(0, size), rng.uniform(0, size * 0.72)
        radius = rng.uniform(10, 40) * s
        start = rng.uniform(0, 360)
        color = rng.choice(blues) if rng.random() > 0.12 else (235, 220, 120)
        draw.arc(
            [x - radius, y - radius, x + radius, y + radius],
            start,
            start + rng.uniform(30, 80),
            fill=color,
            width=max(2, int(3 * s)),
        )
    for cx, cy, r in ((120, 70, 34), (60, 120, 22)):  # two big swirls
        for k in range(r // 5):
            rr = (r - 4 * k) * s
            draw.arc(
                [cx * s - rr, cy * s - rr, cx * s + rr, cy * s + rr],
                40 * k,
                40 * k + 250,
                fill=(170, 210, 240) if k % 2 else (240, 230, 150),
                width=max(2, int(3 * s)),
            )
    for ring, color in ((30, (250, 220, 90)), (22, (255, 200, 60)), (14, (255, 245, 170))):  # moon with halo
        draw.ellipse([(208 - ring) * s, (44 - ring) * s, (208 + ring) * s, (44 + ring) * s], fill=color)
    for _ in range(14):  # stars
        x, y, r = rng.uniform(10, 246) * s, rng.uniform(8, 150) * s, rng.uniform(3, 7) * s
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 240, 150), outline=(250, 250, 220))
    draw.polygon(
        [
            (0, 200 * s),
            (60 * s, 178 * s),
            (130 * s, 196 * s),
            (200 * s, 172 * s),
            (256 * s, 190 * s),
            (256 * s, 256 * s),
            (0, 256 * s),
        ],
        fill=(30, 60, 60),
    )
    for _ in range(160):  # brushy hills
        x, y = rng.uniform(0, size), rng.uniform(190 * s, size)
        draw.line(
            [x, y, x + rng.uniform(6, 16) * s, y + rng.uniform(-3, 3) * s],
            fill=rng.choice([(40, 90, 80), (60, 110, 90), (25, 50, 70)]),
            width=max(2, int(3 * s)),
        )
    draw.polygon(
        [(40 * s, 256 * s), (52 * s, 120 * s), (60 * s, 60 * s), (70 * s, 125 * s), (84 * s, 256 * s)],
        fill=(15, 35, 20),
    )  # cypress
    for _ in range(60):
        x, y = rng.uniform(48, 76) * s, rng.uniform(80, 250) * s
        draw.arc(
            [x - 6 * s, y - 6 * s, x + 6 * s, y + 6 * s],
            rng.uniform(0, 360),
            rng.uniform(0, 360),
            fill=(35, 70, 40),
            width=2,
        )
    return image.filter(ImageFilter.SMOOTH)


def draw_sunflower(size: int = 256) -> Image.Image:
    """A drawn sunflower (yellow petals, brown seed disc, stem and leaves) on a pale background."""
    image = Image.new("RGB", (size, size), (236, 242, 248))
    draw = ImageDraw.Draw(image)
    s = size / 256
    cx, cy = 128 * s, 96 * s
    draw.line([cx, cy, cx + 6 * s, 250 * s], fill=(60, 130, 50), width=max(3, int(9 * s)))  # stem
    draw.ellipse([cx - 70 * s, 160 * s, cx + 4 * s, 196 * s], fill=(70, 150, 60))  # leaves
    draw.ellipse([cx + 8 * s, 190 * s, cx + 78 * s, 224 * s], fill=(70, 150, 60))
    for k in range(16):  # petals
        angle = 2 * math.pi * k / 16
        px, py = cx + 52 * s * math.cos(angle), cy + 52 * s * math.sin(angle)
        draw.ellipse([px - 18 * s, py - 18 * s, px + 18 * s, py + 18 * s], fill=(250, 200, 30), outline=(220, 160, 20))
    draw.ellipse([cx - 34 * s, cy - 34 * s, cx + 34 * s, cy + 34 * s], fill=(110, 65, 25))  # seed disc
    for k in range(40):
        angle, radius = k * 2.4, 30 * s * math.sqrt(k / 40)
        x, y = cx + radius * math.cos(angle), cy + radius * math.sin(angle)
        draw.ellipse([x - 2 * s, y - 2 * s, x + 2 * s, y + 2 * s], fill=(70, 40, 15))
    return image


def draw_vase(size: int = 256) -> Image.Image:
    """A drawn blue ceramic vase with a white pattern on a wooden table."""
    image = Image.new("RGB", (size, size), (245, 238, 225))
    draw = ImageDraw.Draw(image)
    s = size / 256
    draw.rectangle([0, 204 * s, size, size], fill=(170, 120, 75))  # table
    draw.line([0, 204 * s, size, 204 * s], fill=(120, 80, 45), width=max(1, int(3 * s)))
    draw.ellipse(
        [74 * s, 96 * s, 182 * s, 212 * s], fill=(40, 80, 170), outline=(20, 40, 100), width=max(1, int(3 * s))
    )  # body
    draw.rectangle([104 * s, 44 * s, 152 * s, 110 * s], fill=(40, 80, 170))  # neck
    draw.line([104 * s, 44 * s, 104 * s, 108 * s], fill=(20, 40, 100), width=max(1, int(3 * s)))
    draw.line([152 * s, 44 * s, 152 * s, 108 * s], fill=(20, 40, 100), width=max(1, int(3 * s)))
    draw.ellipse(
        [96 * s, 34 * s, 160 * s, 54 * s], fill=(55, 100, 190), outline=(20, 40, 100), width=max(1, int(3 * s))
    )  # rim
    draw.ellipse([106 * s, 38 * s, 150 * s, 50 * s], fill=(20, 35, 80))  # opening
    for x in (98, 128, 158):  # white pattern
        draw.ellipse([(x - 9) * s, 140 * s, (x + 9) * s, 158 * s], outline=(235, 240, 250), width=max(1, int(3 * s)))
    draw.arc([84 * s, 112 * s, 172 * s, 140 * s], 10, 170, fill=(235, 240, 250), width=max(1, int(3 * s)))
    draw.arc([84 * s, 160 * s, 172 * s, 196 * s], 190, 350, fill=(235, 240, 250), width=max(1, int(3 * s)))
    draw.ellipse([86 * s, 110 * s, 100 * s, 150 * s], fill=(110, 150, 220))  # highlight
    return image


# file name in workflows/input -> its drawing
INPUT_IMAGES: dict[str, Callable[[], Image.Image]] = {
    "thinkdiff_red_car.png": lambda: draw_toy_car((220, 40, 40)),
    "thinkdiff_blue_car.png": lambda: draw_toy_car((40, 90, 220)),
    "thinkdiff_style_painting.png": draw_style_painting,
    "thinkdiff_sunflower.png": draw_sunflower,
    "thinkdiff_vase.png": draw_vase,
}
