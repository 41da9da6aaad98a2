"""The experiment's data: an ImageFolder whose class is decided by two attributes (colour x shape), the
description of every training image, and the per-image and per-class tables of a bag-of-words encoder."""
from __future__ import annotations

import math
import os
import random
import re
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor

from ..io import atomic_write_json, atomic_write_text, sha256_lines

COLOURS = {"red": (215, 45, 45), "green": (45, 175, 60), "blue": (50, 80, 220)}
SHAPES = ("circle", "square")
CLASS_TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "a {} on a plain background.")
ENCODER = "bag-of-words (gpt4image/experiment/data.py)"


def class_names() -> list[str]:
    """Class folder names in ImageFolder order (sorted)."""
    return sorted(f"{colour}_{shape}" for colour in COLOURS for shape in SHAPES)


def draw(colour: str, shape: str, rng: random.Random, size: int) -> tuple[object, dict[str, str]]:
    """One image: the shape in its colour (jittered), at a random size and place, on a random dark
    background. Returns (PIL image, its irrelevant details as words)."""
    from PIL import Image, ImageDraw
    shade = rng.randint(0, 90)
    img = Image.new("RGB", (size, size), tuple(max(0, shade + rng.randint(-15, 15)) for _ in range(3)))
    fill = tuple(max(0, min(255, v + rng.randint(-30, 30))) for v in COLOURS[colour])
    big = rng.random() < 0.5
    r = rng.uniform(0.3, 0.42) * size if big else rng.uniform(0.18, 0.28) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    d = ImageDraw.Draw(img)
    (d.ellipse if shape == "circle" else d.rectangle)([cx - r, cy - r, cx + r, cy + r], fill=fill)
    where = f"{'upper' if cy < size / 2 else 'lower'} {'left' if cx < size / 2 else 'right'}"
    return img, {"size": "large" if big else "small", "where": where, "background": "black" if shade < 45 else "grey"}


def describe(colour: str, shape: str, details: dict[str, str]) -> str:
    """What a describing model that sees the image would write: its attributes and irrelevant detail."""
    return (f"The image shows a {details['size']} {colour} {shape} in the {details['where']} part of the picture "
            f"on a {details['background']} background.")


def make_data(root: str, train_per_class: int, val_per_class: int, size: int,
              seed: int = 0) -> tuple[list[str], list[str]]:
    """``root/train`` and ``root/val`` (one folder per class) and the training descriptions in
    ImageFolder order; returns (descriptions, relative file list)."""
    rng = random.Random(seed)
    texts, files = [], []
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name in class_names():
            colour, shape = name.split("_")
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(count):
                img, details = draw(colour, shape, rng, size)
                img.save(os.path.join(root, split, name, f"{i:04d}.png"))
                if split == "train":
                    texts.append(describe(colour, shape, details))
                    files.append(f"{name}/{i:04d}.png")
    return texts, files


def bag_of_words(texts: list[str], dim: int = 64, seed: int = 0) -> Tensor:
    """[len(texts), dim] unit rows, a TF-IDF bag of words: each word's fixed random Gaussian vector (seeded
    by the word's CRC32) weighted by its count x log(M / number of the M texts holding it), summed and
    L2-normalised. Words every text holds weigh nothing; nothing is learned."""
    tokenised = [re.findall(r"[a-z]+", text.lower()) for text in texts]
    holding = {}
    for words in tokenised:
        for w in set(words):
            holding[w] = holding.get(w, 0) + 1
    vectors = {w: torch.randn(dim, generator=torch.Generator().manual_seed(seed * 2 ** 32 + zlib.crc32(w.encode())))
               for w in holding}
    rows = [sum((math.log(len(texts) / holding[w]) * vectors[w] for w in words), torch.zeros(dim))
            for words in tokenised]
    return F.normalize(torch.stack(rows), dim=1)


def write_tables(out: str, texts: list[str], files: list[str]) -> tuple[str, str]:
    """The per-image table (row k: training image k) and the per-class table, as description2embedding.py
    would write them (a tensor and its ``.json`` metadata); returns their paths."""
    from ..train.class_descriptions import per_class_rows
    image_table = os.path.join(out, "text_emb.pth")
    torch.save(bag_of_words(texts), image_table)
    atomic_write_text(image_table + ".files.txt", "".join(f + "\n" for f in files))
    atomic_write_json(image_table + ".json", {"encoder": ENCODER, "file_list_sha256": sha256_lines(files),
                                              "file_list": os.path.basename(image_table) + ".files.txt"})
    names = class_names()
    prompts = [template.format(name.replace("_", " ")) for name in names for template in CLASS_TEMPLATES]
    owners = torch.arange(len(names)).repeat_interleave(len(CLASS_TEMPLATES))
    class_table = os.path.join(out, "class_text_emb.pth")
    torch.save(per_class_rows(bag_of_words(prompts), owners, len(names)), class_table)
    atomic_write_json(class_table + ".json", {"encoder": ENCODER, "classes": names})
    return image_table, class_table

