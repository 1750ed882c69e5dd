"""Synthetic, labelled inputs for the OCR models of the bench: text lines with known strings, the same lines
upright or upside down, pages of lines (PP-OCR, preprocessed as rapidocr does), captchas of known strings and
scenes of letters with their boxes (ddddocr, preprocessed as ddddocr does)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
)
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there had all one word can model page text line quick brown fox jumps over lazy dog invoice "
    "total date order number street city amount paid due"
).split()


def _font(rng: np.random.Generator, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.truetype(FONTS[int(rng.integers(len(FONTS)))], size)
    except OSError:
        return ImageFont.load_default()


def _string(rng: np.random.Generator) -> str:
    """A few words, sometimes with a number: what a receipt or a page line holds."""
    words = [str(w) for w in rng.choice(WORDS, int(rng.integers(1, 4)))]
    if rng.random() < 0.5:
        words.insert(int(rng.integers(len(words) + 1)), str(int(rng.integers(1, 10000))))
    if rng.random() < 0.3:
        words[0] = words[0].capitalize()
    return " ".join(words)


def _line(rng: np.random.Generator, text: str) -> Image.Image:
    """The text on a light background, dark ink, a little noise, cropped to its box with a margin."""
    font = _font(rng, int(rng.integers(26, 40)))
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    margin = int(rng.integers(4, 12))
    image = Image.new("L", (right - left + 2 * margin, bottom - top + 2 * margin), int(rng.integers(200, 256)))
    ImageDraw.Draw(image).text((margin - left, margin - top), text, fill=int(rng.integers(0, 70)), font=font)
    noisy = np.asarray(image, np.float32) + rng.normal(0, 6, (image.size[1], image.size[0]))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _normalized(image: Image.Image, height: int, width: int) -> np.ndarray:
    """rapidocr's resize_norm_img: the height to `height`, the width by the aspect ratio (at most `width`),
    (x / 255 - 0.5) / 0.5, zero-padded on the right: [3, height, width]."""
    resized_w = min(width, math.ceil(height * image.size[0] / image.size[1]))
    gray = np.asarray(image.convert("L").resize((resized_w, height), Image.BILINEAR), np.float32)
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :resized_w] = (gray / 255 - 0.5) / 0.5
    return out


def lines(count: int, seed: int, height: int = 48, width: int = 320) -> tuple[np.ndarray, list[str]]:
    """[count, 3, 48, 320] recognizer inputs and their strings (lines that fit 320 wide at height 48)."""
    rng = np.random.default_rng(seed)
    inputs, strings = [], []
    while len(strings) < count:
        text = _string(rng)
        image = _line(rng, text)
        if image.size[0] / image.size[1] > width / height:
            continue
        inputs.append(_normalized(image, height, width))
        strings.append(text)
    return np.stack(inputs), strings


def directions(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[count, 3, 48, 192] direction-classifier inputs and labels (0: upright, 1: upside down), in turn."""
    rng = np.random.default_rng(seed)
    inputs, labels = [], []
    for i in range(count):
        image = _line(rng, _string(rng))
        flipped = i % 2
        inputs.append(_normalized(image.rotate(180) if flipped else image, 48, 192))
        labels.append(flipped)
    return np.stack(inputs), np.array(labels, np.int64)


def pages(count: int, seed: int, size: int = 480) -> np.ndarray:
    """[count, 3, size, size] detector inputs: lines of text placed on a light page, normalized as rapidocr's
    detector expects ((x / 255 - 0.5) / 0.5)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        page = Image.new("L", (size, size), int(rng.integers(215, 256)))
        y = int(rng.integers(5, 30))
        while y < size - 40:
            line = _line(rng, _string(rng))
            if line.size[0] < size - 10:
                page.paste(line, (int(rng.integers(0, size - line.size[0])), y))
            y += line.size[1] + int(rng.integers(4, 30))
        out.append(np.repeat(((np.asarray(page, np.float32) / 255 - 0.5) / 0.5)[None], 3, axis=0))
    return np.stack(out)


CAPTCHA_LETTERS = "abcdefghjkmnpqrstuvwxyz23456789"
BOLD = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"


def captchas(count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """[count, 1, 64, 160] captchas (4-5 letters or digits in bold, jittered, two stray lines; x / 255, as
    ddddocr feeds its recognizer) and their strings."""
    rng = np.random.default_rng(seed)
    images, strings = [], []
    for _ in range(count):
        text = "".join(str(c) for c in rng.choice(list(CAPTCHA_LETTERS), int(rng.integers(4, 6))))
        image = Image.new("L", (160, 64), int(rng.integers(200, 256)))
        draw = ImageDraw.Draw(image)
        x = int(rng.integers(4, 16))
        for char in text:
            try:
                font: ImageFont.FreeTypeFont | ImageFont.ImageFont = ImageFont.truetype(BOLD, int(rng.integers(30, 40)))
            except OSError:
                font = ImageFont.load_default()
            draw.text((x, int(rng.integers(0, 14))), char, fill=int(rng.integers(0, 90)), font=font)
            x += int(rng.integers(22, 30))
        for _ in range(2):
            draw.line([tuple(rng.integers(0, 160, 2)), tuple(rng.integers(0, 64, 2))], fill=int(rng.integers(60, 160)))
        images.append(np.asarray(image, np.float32)[None] / 255)
        strings.append(text)
    return np.stack(images), strings


def scenes(count: int, seed: int, size: int = 416) -> tuple[np.ndarray, list[list[list[float]]]]:
    """[count, 3, 416, 416] detector inputs (BGR, 0-255, as ddddocr feeds its YOLOX detector): 3-5 capital
    letters scattered without overlap on a plain background, and each letter's box [x1, y1, x2, y2]."""
    rng = np.random.default_rng(seed)
    images, boxes = [], []
    for _ in range(count):
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(150, 256, 3)))
        draw = ImageDraw.Draw(image)
        placed: list[list[float]] = []
        for _ in range(int(rng.integers(3, 6))):
            for _ in range(20):  # a place that overlaps no letter so far
                font = ImageFont.truetype(BOLD, int(rng.integers(40, 70)))
                char, x, y = str(rng.choice(list("ABCDEFGHJKLMNPQRSTUVWXYZ"))), *rng.integers(0, size - 70, 2)
                box = [float(v) for v in draw.textbbox((int(x), int(y)), char, font=font)]
                if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in placed):
                    draw.text((int(x), int(y)), char, fill=tuple(int(v) for v in rng.integers(0, 100, 3)), font=font)
                    placed.append(box)
                    break
        images.append(np.asarray(image, np.float32)[:, :, ::-1].transpose(2, 0, 1).copy())
        boxes.append(placed)
    return np.stack(images), boxes
