"""What a run trains towards: the --text-target, --label-noise, --train-fraction and --shots flags,
their checks, and the training set they make: each kept image with the label it trains with and its
text row (label_subsets.py draws the labels, target_rows.py serves the rows).

Everything here is a function of the seed and the full training set only, never of the rank or of
the resume position: a 1-process run, a 2-rank run and a resumed run train on the same images with
the same labels and the same targets.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import KW_ONLY, dataclass
import torch
from torch import Tensor

from ..log import logger
from ..errors import UserError
from ..cli import at_least, in_range
from ..io import atomic_write_json
from ..text.tables import SyntheticTextEmbeddings, WithTextEmbeddings, _validate, load_text_embeddings
from .label_subsets import balanced_subset, dataset_labels, symmetric_label_noise
from .target_rows import ClassRows, IndexedRows, RandomRows, class_mean_table, shuffled_index
from .text_per_step import keep_described

TEXT_TARGETS = ("image", "class-mean", "class-text", "shuffled", "random")
CLASS_LEVEL = ("class-mean", "class-text")  # several images of a batch share one row: positives of each other
FIXED_ON_RESUME = ("text_target", "label_noise", "train_fraction", "shots")  # a resume never changes them
TRAIN_LABELS = "train_labels.json"


def add_text_target_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--text-target, --label-noise, --train-fraction, --shots (both recipes)."""
    p.add_argument("--text-target", choices=TEXT_TARGETS, default="image",
                   help="image: row k for image k (the paper); class-mean: the renormalised mean row of the image's "
                        "class; class-text: the class's row of a per-class table (description2embedding.py "
                        "--per-class); shuffled: rows permuted within each class (control); random: a fixed random "
                        "unit vector per image (control). Classes are the labels the run trains with")
    p.add_argument("--label-noise", type=in_range(minimum=0, below=1), default=0.0, metavar="P",
                   help="replace floor(P x N) training labels by a different class drawn uniformly (seeded)")
    p.add_argument("--train-fraction", type=in_range(above=0, maximum=1), default=1.0, metavar="F",
                   help="train on floor(F x n_c) images of every class c (at least 1; seeded)")
    p.add_argument("--shots", type=at_least(1), default=None, metavar="K",
                   help="train on K images of every class (seeded)")
    return p


@dataclass(frozen=True)
class TrainingTargets:
    """The run's choices of text target and labels; ``seed`` is the run's --seed."""
    num_classes: int
    _: KW_ONLY
    text_target: str = "image"
    label_noise: float = 0.0
    train_fraction: float = 1.0
    shots: int | None = None
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace, num_classes: int) -> TrainingTargets:
        return cls(num_classes, text_target=getattr(args, "text_target", "image"),
                   label_noise=getattr(args, "label_noise", 0.0), train_fraction=getattr(args, "train_fraction", 1.0),
                   shots=getattr(args, "shots", None), seed=args.seed)

    @property
    def released(self) -> bool:
        """True when nothing differs from the paper's run (the released code path is used unchanged)."""
        return (self.text_target, self.label_noise, self.train_fraction, self.shots) == ("image", 0.0, 1.0, None)


def fixed_on_resume(saved_args: dict) -> tuple[str, ...]:
    """The arguments a resume of the run of ``saved_args`` never changes: the four above, and --seed
    when it drew the run's images, labels or text targets."""
    chose = (saved_args.get("text_target", "image"), saved_args.get("label_noise", 0.0),
             saved_args.get("train_fraction", 1.0), saved_args.get("shots")) != ("image", 0.0, 1.0, None)
    return FIXED_ON_RESUME + (("seed",) if chose else ())


class TrainingSubset(torch.utils.data.Dataset):
    """Sample k is image ``indices[k]`` of ``dataset`` with label ``labels[k]`` (the label trained with)."""

    def __init__(self, dataset: torch.utils.data.Dataset, indices: Tensor, labels: Tensor) -> None:
        self.dataset, self.indices, self.labels = dataset, indices, labels
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[object, int]:
        image, _ = self.dataset[int(self.indices[k])]
        return image, int(self.labels[k])


def _load_table(text_emb, generated, rows):
    """The --text_emb table; on generated data without a file, a random one of ``rows`` x 1024."""
    if generated and not os.path.isfile(text_emb):
        logger.info(f"generated data: random {rows} x 1024 text embeddings (no file {text_emb!r} needed)")
        return SyntheticTextEmbeddings(rows, 1024)
    table = load_text_embeddings(text_emb, validate=False)
    if table.table.dim() == 3:  # several descriptions per image (--text-per-step), not read here yet
        raise UserError(f"text embeddings {text_emb!r} hold {table.table.shape[1]} descriptions per image "
                        f"({list(table.table.shape)}), which --text-target, --label-noise, --train-fraction and "
                        f"--shots cannot use yet; average them into an [N, D] table, or train without those flags")
    _validate(table.table, text_emb)
    return table


def _class_table(text_emb, generated, train, num_classes):
    """The per-class table of --text-target class-text, checked against the training classes."""
    table = _load_table(text_emb, generated, num_classes)
    if len(table) != num_classes:
        raise UserError(f"--text-target class-text: {text_emb!r} has {len(table)} rows but the training set has "
                        f"{num_classes} classes; make a per-class table (one row per class) with "
                        f"description2embedding.py --per-class --data <train folder>")
    recorded, classes = table.metadata.get("classes"), getattr(train, "classes", None)
    if recorded is not None and classes is not None and list(recorded) != list(classes):
        k = next((i for i, (a, b) in enumerate(zip(recorded, classes)) if a != b), min(len(recorded), len(classes)))
        raise UserError(f"--text-target class-text: {text_emb!r} was made for other classes (class {k}: table "
                        f"{recorded[k] if k < len(recorded) else '(none)'!r}, folder "
                        f"{classes[k] if k < len(classes) else '(none)'!r}); regenerate it with --per-class --data")
    return table


def attach_training_targets(train: torch.utils.data.Dataset, text_emb: str | None, generated: bool,
                            targets: TrainingTargets) -> tuple[torch.utils.data.Dataset, object]:
    """(dataset of (image, label trained with, text target), row source or None) for ``targets``.

    The full training set is checked against the table first (row count, file list); then the
    subset is drawn, the labels are noised, and each kept image gets its text target. The dataset
    carries ``train_labels`` (what ``write_train_labels`` saves)."""
    none = text_emb is None or str(text_emb).lower() == "none"
    if targets.shots is not None and targets.train_fraction < 1:
        raise UserError(f"--shots {targets.shots} and --train-fraction {targets.train_fraction:g} both choose the "
                        f"images to train on; pass one of them")
    if none and targets.text_target != "image":
        raise UserError(f"--text-target {targets.text_target} needs a text table: pass --text_emb (or leave "
                        f"--text-target out for the baseline with --text_emb none)")
    table = None
    if not none and targets.text_target != "class-text":
        table = _load_table(text_emb, generated, len(train))
        train = keep_described(train, table)  # a --drop-flagged table leaves images out
        WithTextEmbeddings(train, table)  # row count and file list of the full set
    original = dataset_labels(train)
    num_classes = targets.num_classes
    kept = balanced_subset(original, num_classes, targets.train_fraction, targets.shots, targets.seed)
    labels = symmetric_label_noise(original[kept], num_classes, targets.label_noise, targets.seed)
    flipped = int((labels != original[kept]).sum())
    dataset = TrainingSubset(train, kept, labels)
    dataset.train_labels = {"indices": kept.tolist(), "labels": labels.tolist(), "original": original[kept].tolist()}
    logger.info(f"training labels: {len(kept)} of {len(train)} images"
                f"{f' ({targets.shots} per class)' if targets.shots else ''}"
                f"{f' (fraction {targets.train_fraction:g} of every class)' if targets.train_fraction < 1 else ''}, "
                f"{flipped} labels flipped by --label-noise {targets.label_noise:g}; text target "
                f"{'none (baseline)' if none else targets.text_target}")
    if none:
        return dataset, None
    rows = _rows_for(targets, train, table, text_emb, generated, kept, labels)
    return WithTextEmbeddings(dataset, rows, check_files=False), rows


def _rows_for(targets, train, table, text_emb, generated, kept, labels):
    kind = targets.text_target
    if kind == "image":
        return table if len(kept) == len(table) else IndexedRows(table, kept)
    if kind == "random":
        return RandomRows(kept, table.dim, targets.seed)
    if kind == "shuffled":
        return IndexedRows(table, kept[shuffled_index(labels, targets.seed)])
    if kind == "class-mean":
        means = class_mean_table(IndexedRows(table, kept), labels, targets.num_classes)
        return ClassRows(means, labels, table.path, table.metadata)
    class_table = _class_table(text_emb, generated, train, targets.num_classes)
    return ClassRows(class_table.table, labels, class_table.path, class_table.metadata)


def find_train_labels(dataset: object) -> dict | None:
    """The ``train_labels`` record of a (possibly wrapped) training set, or None."""
    while dataset is not None:
        record = getattr(dataset, "train_labels", None)
        if record is not None:
            return record
        dataset = getattr(dataset, "dataset", None)
    return None


def write_train_labels(dataset: object, output_dir: str, is_main: bool) -> None:
    """Write ``output_dir/train_labels.json`` ({indices, labels, original}) when the run chose its labels."""
    record = find_train_labels(dataset)
    if record is None or not is_main:
        return
    atomic_write_json(os.path.join(output_dir, TRAIN_LABELS), record)

