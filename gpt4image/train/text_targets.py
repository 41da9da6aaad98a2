"""What a run trains towards: the text target of each image (--text-target, with its controls) and
the labels it learns from (--label-noise, --train-fraction, --shots).

Everything here is a function of the seed and the full training set only, never of the rank or of
the resume position: a 1-process run, a 2-rank run and a resumed run train on the same images with
the same labels and the same targets. Rows are served lazily (an index into the table, a class row,
a seeded random row), so nothing is copied from a memory-mapped ImageNet table.
"""
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..log import logger
from ..errors import UserError
from ..cli import at_least, in_range
from ..io import atomic_write_json
from ..text.tables import SyntheticTextEmbeddings, WithTextEmbeddings, _validate, load_text_embeddings
from .text_per_step import keep_described

TEXT_TARGETS = ("image", "class-mean", "class-text", "shuffled", "random")
CLASS_LEVEL = ("class-mean", "class-text")  # several images of a batch share one row: positives of each other
FIXED_ON_RESUME = ("text_target", "label_noise", "train_fraction", "shots")  # a resume never changes them
TRAIN_LABELS = "train_labels.json"
_SALT = {"subset": 1, "noise": 2, "shuffle": 3, "random": 4}


def add_text_target_args(p):
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
    text_target: str = "image"
    label_noise: float = 0.0
    train_fraction: float = 1.0
    shots: Optional[int] = None
    seed: int = 0

    @classmethod
    def from_args(cls, args, num_classes):
        return cls(num_classes, getattr(args, "text_target", "image"), getattr(args, "label_noise", 0.0),
                   getattr(args, "train_fraction", 1.0), getattr(args, "shots", None), args.seed)

    @property
    def released(self):
        """True when nothing differs from the paper's run (the released code path is used unchanged)."""
        return (self.text_target, self.label_noise, self.train_fraction, self.shots) == ("image", 0.0, 1.0, None)


def fixed_on_resume(saved_args):
    """The arguments a resume of the run of ``saved_args`` never changes: the four above, and --seed
    when it drew the run's images, labels or text targets."""
    chose = (saved_args.get("text_target", "image"), saved_args.get("label_noise", 0.0),
             saved_args.get("train_fraction", 1.0), saved_args.get("shots")) != ("image", 0.0, 1.0, None)
    return FIXED_ON_RESUME + (("seed",) if chose else ())


def _generator(seed, salt):
    return torch.Generator().manual_seed(seed * 1000 + salt)


# ---------------------------------------------------------------------------------------------- labels

def dataset_labels(dataset):
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


def balanced_subset(labels, num_classes, fraction=1.0, shots=None, seed=0):
    """Indices (ascending) of a class-balanced subset: ``shots`` images of every class, or
    floor(fraction x n_c) (at least 1) of class c; each class's images drawn by a seeded permutation."""
    counts = torch.bincount(labels, minlength=num_classes)
    if shots is not None and shots > int(counts.min()):
        c = int(counts.argmin())
        raise UserError(f"--shots {shots} is more than the {int(counts[c])} training images of class {c}, the "
                        f"smallest; use --shots {int(counts[c])} or fewer")
    if shots is None and fraction >= 1.0:
        return torch.arange(len(labels))
    g = _generator(seed, _SALT["subset"])
    kept = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        if len(members) == 0:
            continue
        keep = shots if shots is not None else max(1, math.floor(round(fraction * len(members), 9)))
        kept.append(members[torch.randperm(len(members), generator=g)[:keep]])
    return torch.cat(kept).sort().values


def symmetric_label_noise(labels, num_classes, p, seed=0):
    """A copy of ``labels`` in which floor(p x N) of them, chosen by a seeded permutation, are replaced by
    a different class drawn uniformly among the num_classes - 1 others."""
    n = len(labels)
    flips = math.floor(round(p * n, 9))
    g = _generator(seed, _SALT["noise"])
    chosen = torch.randperm(n, generator=g)[:flips]
    offsets = torch.randint(1, num_classes, (flips,), generator=g)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + offsets) % num_classes
    return noisy


# ------------------------------------------------------------------------------------------ row sources

class IndexedRows:
    """Row k is row ``index[k]`` of ``source`` (a TextEmbeddings or another row source)."""

    def __init__(self, source, index):
        self.source, self.index = source, index
        self.path, self.metadata, self.dim = source.path, source.metadata, source.dim

    def __len__(self):
        return len(self.index)

    def __getitem__(self, k):
        return self.source[int(self.index[k])]


class ClassRows:
    """Row k is the row of image k's class: ``class_table[labels[k]]`` ([C, D] table, [N] labels)."""

    def __init__(self, class_table, labels, path, metadata=None):
        self.class_table, self.labels = class_table, labels
        self.path, self.metadata, self.dim = path, metadata or {}, class_table.shape[1]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, k):
        return self.class_table[int(self.labels[k])]


class RandomRows:
    """Row k is a unit vector drawn from a generator seeded by (seed, ``keys[k]``): fixed for the run,
    the same in every process and after a resume, computed when asked (no N x D table in memory)."""

    def __init__(self, keys, dim, seed):
        self.keys, self.dim, self.seed = keys, dim, seed
        self.path, self.metadata = "<random>", {}

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, k):
        g = torch.Generator().manual_seed((self.seed * 1000 + _SALT["random"]) * 10 ** 9 + int(self.keys[k]))
        return F.normalize(torch.randn(self.dim, generator=g), dim=0)


def class_mean_table(table, labels, num_classes, chunk=65536):
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


def row_blocks(rows, chunk=65536):
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


def per_class_rows(embeddings, owners, num_classes):
    """[C, D] float32: row c is the mean of the encoded descriptions of class c (``embeddings`` [M, D],
    ``owners`` [M] class of each), renormalised to unit length. Every class needs one description."""
    sums = torch.zeros(num_classes, embeddings.shape[1]).index_add_(0, owners, embeddings.float())
    return F.normalize(sums, dim=1)


def shuffled_index(labels, seed):
    """[N] permutation that moves every image of a class with >= 2 images to another image of that
    class (a random cyclic permutation per class, Sattolo's algorithm, seeded): each class keeps its
    multiset of rows and no image keeps its own."""
    g = _generator(seed, _SALT["shuffle"])
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


# --------------------------------------------------------------------------------------------- datasets

class TrainingSubset(torch.utils.data.Dataset):
    """Sample k is image ``indices[k]`` of ``dataset`` with label ``labels[k]`` (the label trained with)."""

    def __init__(self, dataset, indices, labels):
        self.dataset, self.indices, self.labels = dataset, indices, labels
        self.targets = labels.tolist()

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
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


def attach_training_targets(train, text_emb, generated, targets):
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


def find_train_labels(dataset):
    """The ``train_labels`` record of a (possibly wrapped) training set, or None."""
    while dataset is not None:
        record = getattr(dataset, "train_labels", None)
        if record is not None:
            return record
        dataset = getattr(dataset, "dataset", None)
    return None


def write_train_labels(dataset, output_dir, is_main):
    """Write ``output_dir/train_labels.json`` ({indices, labels, original}) when the run chose its labels."""
    record = find_train_labels(dataset)
    if record is None or not is_main:
        return
    atomic_write_json(os.path.join(output_dir, TRAIN_LABELS), record)


# ------------------------------------------------------------------------- per-class descriptions

def _class_entries(path):
    """(class name, description) pairs of a per-class file: a JSON object mapping class folder name ->
    a description or a list of them, or JSONL lines that are such objects or
    ``{"class": NAME, "description" | "text" | "caption": str or [str]}``."""
    import json
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
                        f"JSON {{\"class folder\": \"description\" or [descriptions]}} or JSONL of such objects") from None
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


def read_class_descriptions(path, train_folder):
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
