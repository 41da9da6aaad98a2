"""Training on several descriptions per image: an [N, K, D] table and ``--text-per-step``.

description2embedding.py writes an [N, K, D] table when each image has K descriptions (row [i, k]:
image i's description k). Training turns the K rows of a sample into its one text target:
- ``mean``: the mean of the K unit rows, L2-normalised again (LMM-Reg-CLIP averages its ten);
- ``sample``: row k drawn per sample and epoch, k = mix(seed, epoch, image index) mod K (LaCLIP's
  text augmentation). The draw depends on nothing else, so it is the same after a resume, whatever
  the number of ranks, loader workers or the sample's position in the epoch.
The epoch reaches the table through ``set_epoch``, which the seeded loader calls before every read.

A table made with ``description2embedding.py --drop-flagged`` can leave images out (every
description flagged); ``keep_described`` then trains on the images its file list names.
"""
from __future__ import annotations

import argparse
import os

import torch
from torch import Tensor

from ..log import logger
from ..errors import UserError
from .resumable import mix_seed
from ..text.tables import TextEmbeddings, _validate, load_text_embeddings

MODES = ("mean", "sample")


def add_text_per_step_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--text-per-step mean|sample."""
    p.add_argument("--text-per-step", choices=MODES, default=None,
                   help="for an [N, K, D] table (K descriptions per image): the renormalised mean of the K, or one of "
                        "them drawn per sample and epoch (seeded by --seed, the epoch and the image)")
    return p


def sample_choice(seed: int, epoch: int, index: int, k: int) -> int:
    """Which of the K descriptions image ``index`` uses in ``epoch`` under ``sample``."""
    return mix_seed(seed, epoch, index) % k


class MultiTextEmbeddings(TextEmbeddings):
    """An [N, K, D] table read as an [N, D] one: row ``index`` is the mean or the drawn row of the K."""

    def __init__(self, table: Tensor, path: str, metadata: dict, mode: str, seed: int) -> None:
        super().__init__(table, path, metadata)
        self.mode, self.seed, self.epoch = mode, seed, 0
        self._rows_on_disk = table.shape[0]

    @property
    def dim(self) -> int:
        return self.table.shape[2]

    @property
    def per_image(self) -> int:
        """K, the descriptions of each image."""
        return self.table.shape[1]

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose draw ``sample`` serves."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> Tensor:
        rows = self.table[index]
        if self.mode == "sample":
            return rows[sample_choice(self.seed, self.epoch, index, rows.shape[0])]
        return torch.nn.functional.normalize(rows.float().mean(dim=0), dim=0).to(rows.dtype)

    def __reduce__(self):  # mapped again from its file in a spawned worker, as TextEmbeddings is
        return (_reopen, (self.path, self.metadata, self.mode, self.seed, self.epoch))


def _reopen(path, metadata, mode, seed, epoch):
    table = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    embeddings = MultiTextEmbeddings(table, path, metadata, mode, seed)
    embeddings.epoch = epoch
    return embeddings


def load_training_table(path: str, text_per_step: str | None = None, seed: int = 0) -> TextEmbeddings:
    """The training table at ``path``: [N, D] as before; [N, K, D] read through ``text_per_step``
    (which it needs; and which an [N, D] table refuses)."""
    embeddings = load_text_embeddings(path, validate=False)
    table = embeddings.table
    if table.dim() == 3:
        if text_per_step is None:
            raise UserError(f"text embeddings {path!r} hold {table.shape[1]} descriptions per image "
                            f"({list(table.shape)}); choose how training uses them: --text-per-step mean or "
                            f"--text-per-step sample")
        _validate(table.reshape(-1, table.shape[2]), path)
        logger.info(f"text targets: {table.shape[1]} descriptions per image, --text-per-step {text_per_step}")
        return MultiTextEmbeddings(table, path, embeddings.metadata, text_per_step, seed)
    if text_per_step is not None:
        raise UserError(f"--text-per-step {text_per_step} needs a table of several descriptions per image "
                        f"([N, K, D], description2embedding.py on generate_descriptions.py --num-descriptions K); "
                        f"{path!r} has shape {list(table.shape)}: drop --text-per-step")
    _validate(table, path)
    return embeddings


def keep_described(train: object, embeddings: TextEmbeddings) -> object:
    """``train`` restricted to the images of the table's file list when the table left images out
    (description2embedding.py --drop-flagged); else ``train`` itself."""
    left_out = (embeddings.metadata.get("drop_flagged") or {}).get("images_left_out", 0)
    if not left_out:
        return train
    files = embeddings.file_list()
    samples = getattr(train, "samples", None)
    if files is None or samples is None:
        raise UserError(f"{embeddings.path!r} leaves {left_out} images out (--drop-flagged) but its file list "
                        f"{embeddings.metadata.get('file_list')!r} or the training set's sample list is missing; "
                        f"keep the .files.txt beside the table, or make it without --drop-flagged")
    import copy
    keep = set(files)
    subset = copy.copy(train)
    subset.samples = [s for s in samples if os.path.relpath(s[0], train.root).replace(os.sep, "/") in keep]
    subset.imgs, subset.targets = subset.samples, [target for _, target in subset.samples]
    logger.info(f"training on {len(subset.samples)} of {len(samples)} images: {embeddings.path} leaves out "
                f"{left_out} whose descriptions were all flagged (description2embedding.py --drop-flagged)")
    return subset
