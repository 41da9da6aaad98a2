"""The labels a run learns from: every training image's label read without decoding it, the
class-balanced subset of --train-fraction / --shots and the symmetric noise of --label-noise.

Each draw is a function of the seed and the full training set only (never of the rank or of the
resume position), from its own seeded generator (``seeded_generator``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import UserError

SALT = {"subset": 1, "noise": 2, "shuffle": 3, "random": 4}  # one generator per use of the seed


def seeded_generator(seed: int, use: str) -> torch.Generator:
    """The generator of ``use`` (a key of SALT) for the run's --seed."""
    return torch.Generator().manual_seed(seed * 1000 + SALT[use])


def dataset_labels(dataset: object) -> Tensor:
    """The label of every sample ([N] int64) without decoding an image: ImageFolder's and CIFAR's
    ``targets``, or torchvision FakeData's labels recomputed from its per-index seed."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(list(targets), dtype=torch.long)
    if type(dataset).__name__ == "FakeData":
        labels = torch.empty(len(dataset), dtype=torch.long)
        for index in range(len(dataset)):
            g = torch.Generator().manual_seed(index + dataset.random_offset)
            torch.randn(*dataset.image_size, generator=g)
            labels[index] = torch.randint(0, dataset.num_classes, (1,), generator=g)[0]
        return labels
    raise UserError(f"--label-noise, --train-fraction, --shots and --text-target need the training labels, which a "
                    f"{type(dataset).__name__} does not list; use an image folder (--data)")


def balanced_subset(labels: Tensor, num_classes: int, fraction: float = 1.0, shots: int | None = None,
                    seed: int = 0) -> Tensor:
    """Indices (ascending) of a class-balanced subset: ``shots`` images of every class, or
    floor(fraction x n_c) (at least 1) of class c; each class's images drawn by a seeded permutation."""
    counts = torch.bincount(labels, minlength=num_classes)
    if shots is not None and shots > int(counts.min()):
        c = int(counts.argmin())
        raise UserError(f"--shots {shots} is more than the {int(counts[c])} training images of class {c}, the "
                        f"smallest; use --shots {int(counts[c])} or fewer")
    if shots is None and fraction >= 1.0:
        return torch.arange(len(labels))
    g = seeded_generator(seed, "subset")
    kept = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        if len(members) == 0:
            continue
        keep = shots if shots is not None else max(1, math.floor(round(fraction * len(members), 9)))
        kept.append(members[torch.randperm(len(members), generator=g)[:keep]])
    return torch.cat(kept).sort().values


def symmetric_label_noise(labels: Tensor, num_classes: int, p: float, seed: int = 0) -> Tensor:
    """A copy of ``labels`` in which floor(p x N) of them, chosen by a seeded permutation, are replaced by
    a different class drawn uniformly among the num_classes - 1 others."""
    n = len(labels)
    flips = math.floor(round(p * n, 9))
    g = seeded_generator(seed, "noise")
    chosen = torch.randperm(n, generator=g)[:flips]
    offsets = torch.randint(1, num_classes, (flips,), generator=g)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + offsets) % num_classes
    return noisy
