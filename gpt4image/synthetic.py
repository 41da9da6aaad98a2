"""Generated data for demos and tests: a learnable ImageFolder, descriptions, a tiny random CLIP.

Classes differ visibly (colour and shape), so a small network learns them in a few epochs; every
training image gets a description that names what is drawn, some longer than CLIP's 77 tokens.
"""
from __future__ import annotations

import os
import random

import torch
from PIL import Image, ImageDraw

CLASSES = [  # name, RGB, shape
    ("red_circle", (220, 40, 40), "circle"),
    ("green_square", (40, 180, 60), "square"),
    ("blue_triangle", (40, 70, 220), "triangle"),
    ("yellow_stripes", (230, 210, 40), "stripes"),
    ("purple_cross", (150, 50, 180), "cross"),
    ("cyan_ring", (40, 200, 210), "ring"),
    ("orange_diamond", (240, 140, 30), "diamond"),
    ("grey_dots", (130, 130, 130), "dots"),
]


def make_image(class_index: int, rng: random.Random, size: int = 64) -> Image.Image:
    """One PIL image of class ``class_index``: its shape in its colour, jittered, on a noisy background."""
    _, colour, shape = CLASSES[class_index % len(CLASSES)]
    bg = tuple(rng.randint(0, 70) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    jitter = lambda c: tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in c)  # noqa: E731
    fill = jitter(colour)
    r = rng.uniform(0.25, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "stripes":
        step = max(2, size // 8)
        for x in range(0, size, 2 * step):
            d.rectangle([x, 0, x + step - 1, size], fill=fill)
    elif shape == "cross":
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif shape == "ring":
        d.ellipse(box, outline=fill, width=max(2, int(r / 3)))
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # dots
        for _ in range(12):
            x, y = rng.uniform(0, size), rng.uniform(0, size)
            d.ellipse([x - size / 16, y - size / 16, x + size / 16, y + size / 16], fill=fill)
    return img


def describe(class_index: int, rng: random.Random) -> str:
    """A MiniGPT-4-like description of an image of class ``class_index``; about one in four is
    longer than CLIP's context so that truncation is exercised."""
    name, _, shape = CLASSES[class_index % len(CLASSES)]
    colour = name.split("_")[0]
    text = (f"The image shows a {colour} {shape} drawn on a dark, slightly noisy background. "
            f"The {shape} is {rng.choice(['near the centre', 'off to one side', 'large', 'small'])}.")
    if rng.random() < 0.25:
        text += (" The picture is simple and has no other objects, people or text in it; the edges "
                 "of the shape are sharp and the colours are flat, which suggests that it was made by "
                 "a computer program rather than photographed with a camera in the real world, and "
                 "it could be part of a data set used to test image classifiers.")
    return text


def make_image_folder(root: str, num_classes: int = 4, train_per_class: int = 16, val_per_class: int = 6,
                      size: int = 64, seed: int = 0) -> str:
    """Write ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``; return ``root``."""
    rng = random.Random(seed)
    if num_classes > len(CLASSES):
        raise ValueError(f"at most {len(CLASSES)} generated classes")
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(num_classes):
            folder = os.path.join(root, split, CLASSES[c][0])
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                make_image(c, rng, size).save(os.path.join(folder, f"{split}_{i:04d}.jpg"), quality=90)
    return root


def describe_image_folder(train_root: str, seed: int = 0) -> tuple[list[str], list[str]]:
    """One description per image of ``ImageFolder(train_root)``, in its order, and the file list."""
    from .describe.listing import list_image_folder
    rng = random.Random(seed)
    files = list_image_folder(train_root)
    classes = {name: i for i, (name, _, _) in enumerate(CLASSES)}
    return [describe(classes[f.split("/")[0]], rng) for f in files], files


def tiny_clip_state_dict(embed_dim: int = 64, width: int = 64, layers: int = 1, seed: int = 0) -> dict:
    """State dict (OpenAI's key layout) of a randomly initialised tiny CLIP.

    Widths are multiples of 64 and heads = width / 64, so ``clip.model.build_model`` infers exactly
    this architecture back from the keys. The vocabulary and context are CLIP's real ones.
    """
    from ._compat import import_clip
    import_clip()
    from clip.model import CLIP
    torch.manual_seed(seed)
    model = CLIP(embed_dim=embed_dim, image_resolution=32, vision_layers=1, vision_width=64,
                 vision_patch_size=16, context_length=77, vocab_size=49408,
                 transformer_width=width, transformer_heads=width // 64, transformer_layers=layers)
    return model.state_dict()


def save_tiny_clip(path: str, **kwargs: int) -> str:
    torch.save(tiny_clip_state_dict(**kwargs), path)
    return path


def save_tiny_open_clip(directory: str, seed: int = 0) -> str:
    """A small open_clip model config (``tiny_open_clip.json``, CLIP's real tokenizer and context)
    and random weights (``tiny_open_clip.pt``) in ``directory``; returns the ``--model`` value
    ``open_clip:CONFIG:WEIGHTS``."""
    import json
    from ._compat import ensure_torchvision_importable
    ensure_torchvision_importable()
    import open_clip
    os.makedirs(directory, exist_ok=True)
    config = os.path.join(directory, "tiny_open_clip.json")
    with open(config, "w") as f:
        json.dump({"embed_dim": 48,
                   "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
                   "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}, f)
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model("tiny_open_clip")
    weights = os.path.join(directory, "tiny_open_clip.pt")
    torch.save(model.state_dict(), weights)
    return f"open_clip:{config}:{weights}"


def save_tiny_hf_text_encoder(kind: str, directory: str, seed: int = 0) -> str:
    """A tiny random transformers text encoder with a byte-level tokenizer made in code, saved to
    ``directory``: ``kind`` "clip" (CLIPTextModelWithProjection, 40-d projection, context 77) or
    "bert" (BertModel, hidden 32, context 128). Returns the ``--model`` value ``hf:DIR``."""
    from transformers import BertConfig, BertModel, CLIPTextConfig, CLIPTextModelWithProjection
    from .describe.tiny_vlm import byte_level_tokenizer
    torch.manual_seed(seed)
    if kind == "clip":
        tok = byte_level_tokenizer([], eos="<|endoftext|>", pad="<|endoftext|>", bos="<|startoftext|>",
                                   wrap=("<|startoftext|>", "<|endoftext|>"))
        tok.model_max_length = 77
        model = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            projection_dim=40, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    elif kind == "bert":
        tok = byte_level_tokenizer([], eos=None, pad="[PAD]", wrap=("[CLS]", "[SEP]"), cls_token="[CLS]",
                                   sep_token="[SEP]", unk_token="[UNK]", mask_token="[MASK]")
        tok.model_max_length = 128
        model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=128,
                                     pad_token_id=tok.pad_token_id))
    else:
        raise ValueError(f"unknown kind {kind!r}; use clip or bert")
    model.eval().save_pretrained(directory)
    tok.save_pretrained(directory)
    return f"hf:{directory}"
