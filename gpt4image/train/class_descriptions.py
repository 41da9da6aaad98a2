"""Per-class descriptions (description2embedding.py --per-class): the file that gives each class
folder its description(s), and the per-class table of their encoded rows (--text-target class-text)."""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError


def per_class_rows(embeddings: Tensor, owners: Tensor, num_classes: int) -> Tensor:
    """[C, D] float32: row c is the mean of the encoded descriptions of class c (``embeddings`` [M, D],
    ``owners`` [M] class of each), renormalised to unit length. Every class needs one description."""
    sums = torch.zeros(num_classes, embeddings.shape[1]).index_add_(0, owners, embeddings.float())
    return F.normalize(sums, dim=1)


def _class_entries(path):
    """(class name, description) pairs of a per-class file: a JSON object mapping class folder name ->
    a description or a list of them, or JSONL lines that are such objects or
    ``{"class": NAME, "description" | "text" | "caption": str or [str]}``."""
    if not os.path.isfile(path):
        raise UserError(f"per-class description file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            if path.lower().endswith(".jsonl"):
                objects = [json.loads(line) for line in f if line.strip()]
            else:
                objects = [json.load(f)]
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot read per-class description file {path!r} ({type(e).__name__}: {e}); it must be "
                        f"JSON {{\"class folder\": \"description\" or [descriptions]}} "
                        f"or JSONL of such objects") from None
    pairs = []
    for k, obj in enumerate(objects):
        if not isinstance(obj, dict):
            raise UserError(f"{path!r}: entry {k} is a JSON {type(obj).__name__}; expected an object mapping class "
                            f"folder name -> description(s)")
        if "class" in obj:
            text = next((obj[key] for key in ("description", "text", "caption") if key in obj), None)
            obj = {obj["class"]: text}
        for name, texts in obj.items():
            texts = [texts] if isinstance(texts, str) else texts
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                raise UserError(f"{path!r}: class {name!r} has {texts!r}; expected a non-empty description or a "
                                f"list of them")
            pairs += [(str(name), t) for t in texts]
    return pairs


def read_class_descriptions(path: str, train_folder: str) -> tuple[list[str], Tensor, list[str]]:
    """(descriptions, [M] class index of each, class names in ImageFolder order) for --per-class.
    Every class folder of ``train_folder`` needs at least one description; a name that is no folder
    is refused (a typo would silently leave a class without text)."""
    from torchvision.datasets.folder import find_classes
    if not train_folder or not os.path.isdir(train_folder):
        raise UserError(f"--per-class needs --data <train folder> (its class folders order the rows); got "
                        f"{train_folder!r}")
    classes, index = find_classes(train_folder)
    pairs = _class_entries(path)
    unknown = sorted({name for name, _ in pairs} - set(classes))
    if unknown:
        raise UserError(f"{path!r} names {len(unknown)} class(es) that are no folder of {train_folder!r} (e.g. "
                        f"{unknown[0]!r}); keys must be the class folder names")
    missing = [name for name in classes if name not in {n for n, _ in pairs}]
    if missing:
        raise UserError(f"{path!r} has no description for {len(missing)} class(es) of {train_folder!r} (e.g. "
                        f"{missing[0]!r}); give every class folder at least one description")
    return [t for _, t in pairs], torch.tensor([index[n] for n, _ in pairs]), classes
