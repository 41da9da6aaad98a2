"""Row sources: the text row each kept training image trains towards, served lazily (an index into
the table, a class row, a seeded random row), so that nothing is copied from a memory-mapped
ImageNet table; and the rows of a source read a block at a time.

A row source has ``len``, ``[k]`` (a [D] row), ``dim``, ``path`` and ``metadata``, as a TextEmbeddings.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .label_subsets import SALT, seeded_generator


class IndexedRows:
    """Row k is row ``index[k]`` of ``source`` (a TextEmbeddings or another row source)."""

    def __init__(self, source: object, index: Tensor) -> None:
        self.source, self.index = source, index
        self.path, self.metadata, self.dim = source.path, source.metadata, source.dim

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> Tensor:
        return self.source[int(self.index[k])]


class ClassRows:
    """Row k is the row of image k's class: ``class_table[labels[k]]`` ([C, D] table, [N] labels)."""

    def __init__(self, class_table: Tensor, labels: Tensor, path: str, metadata: dict | None = None) -> None:
        self.class_table, self.labels = class_table, labels
        self.path, self.metadata, self.dim = path, metadata or {}, class_table.shape[1]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, k: int) -> Tensor:
        return self.class_table[int(self.labels[k])]


class RandomRows:
    """Row k is a unit vector drawn from a generator seeded by (seed, ``keys[k]``): fixed for the run,
    the same in every process and after a resume, computed when asked (no N x D table in memory)."""

    def __init__(self, keys: Tensor, dim: int, seed: int) -> None:
        self.keys, self.dim, self.seed = keys, dim, seed
        self.path, self.metadata = "<random>", {}

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, k: int) -> Tensor:
        g = torch.Generator().manual_seed((self.seed * 1000 + SALT["random"]) * 10 ** 9 + int(self.keys[k]))
        return F.normalize(torch.randn(self.dim, generator=g), dim=0)


def shuffled_index(labels: Tensor, seed: int) -> Tensor:
    """[N] permutation that moves every image of a class with >= 2 images to another image of that
    class (a random cyclic permutation per class, Sattolo's algorithm, seeded): each class keeps its
    multiset of rows and no image keeps its own."""
    g = seeded_generator(seed, "shuffle")
    index = torch.arange(len(labels))
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten().tolist()
        order = list(members)
        draws = torch.rand(len(order), generator=g).tolist()
        for i in range(len(order) - 1, 0, -1):
            j = int(draws[i] * i)  # uniform in [0, i): Sattolo's cycle
            order[i], order[j] = order[j], order[i]
        index[members] = torch.tensor(order, dtype=torch.long)
    return index


def class_mean_table(table: object, labels: Tensor, num_classes: int, chunk: int = 65536) -> Tensor:
    """[C, D] float32: the mean of the rows of each class, renormalised to unit length (a class
    without images gets a zero row, which no image uses). ``table`` rows are the images', in order."""
    sums = torch.zeros(num_classes, table.dim)
    for start in range(0, len(labels), chunk):
        sums.index_add_(0, labels[start:start + chunk], _block(table, start, start + chunk).float())
    return F.normalize(sums, dim=1)


def _block(rows, start, end):
    """Rows start..end of a TextEmbeddings, an IndexedRows over one or ClassRows, read with one
    indexing call (other row sources row by row)."""
    if isinstance(rows, IndexedRows) and hasattr(rows.source, "table") and rows.source.table.dim() == 2:
        return rows.source.table[rows.index[start:end]]
    if isinstance(rows, ClassRows):
        return rows.class_table[rows.labels[start:end]]
    if hasattr(rows, "table") and rows.table.dim() == 2:
        return rows.table[start:end]
    return torch.stack([rows[k] for k in range(start, min(end, len(rows)))])


def row_blocks(rows: object, chunk: int = 65536) -> Iterator[Tensor]:
    """The rows a run trains towards, ``chunk`` at a time ([n, D] tensors): of a TextEmbeddings, of
    the row sources above (the kept images, their class rows), or of an [N, K, D] table (under
    --text-per-step mean the renormalised means, under sample all N x K descriptions it may draw)."""
    table = getattr(rows, "table", None)
    if table is not None and table.dim() == 3:
        for start in range(0, table.shape[0], chunk):
            block = table[start:start + chunk].float()
            if getattr(rows, "mode", None) == "mean":
                yield F.normalize(block.mean(dim=1), dim=1)
            else:
                yield block.reshape(-1, table.shape[2])
        return
    for start in range(0, len(rows), chunk):
        yield _block(rows, start, min(start + chunk, len(rows)))
