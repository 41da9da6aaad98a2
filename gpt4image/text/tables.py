"""The embedding table written by description2embedding.py, and datasets that carry its rows."""
import json
import os
from typing import Any

import torch

from ..errors import UserError
from ..io import load_error, sha256_lines

NORM_TOLERANCE = 1e-2  # fp16 rounding of a unit row of width 1024 stays far below this


class TextEmbeddings:
    """An [N, D] table of unit rows, memory-mapped from disk in its stored dtype.

    Every process that maps the same file (ranks, DataLoader workers) shares one copy of its pages
    in the page cache. Rows are returned in the stored dtype; cast per batch on the device.
    """

    def __init__(self, table: torch.Tensor, path: str, metadata: dict[str, Any] | None = None):
        self.table = table
        self.path = path
        self.metadata = metadata or {}

    def __len__(self):
        return self.table.shape[0]

    def __getitem__(self, index):
        return self.table[index]

    def __reduce__(self):
        # Sent to a spawned DataLoader worker, the table is mapped again from its file: pickling the
        # tensor would copy it into a new shared-memory segment per receiving process tree.
        if os.path.isfile(self.path) and self.table.shape[0] == getattr(self, "_rows_on_disk", -1):
            return (_reopen, (self.path, self.metadata))
        return super().__reduce__()

    @property
    def dim(self) -> int:
        return self.table.shape[1]

    def file_list(self) -> list[str] | None:
        """The ordered train-file list recorded by description2embedding.py, or None."""
        name = self.metadata.get("file_list")
        if not name:
            return None
        path = os.path.join(os.path.dirname(os.path.abspath(self.path)), name)
        if not os.path.isfile(path):
            return None
        from ..describe.listing import text_lines
        with open(path, encoding="utf-8", newline="") as f:
            return text_lines(f.read())


def _validate(table, path, chunk_rows=65536):
    if table.dim() == 3:
        raise UserError(f"text embeddings {path!r} hold {table.shape[1]} descriptions per image ({list(table.shape)}); "
                        f"only training reads such a table (--text_emb with --text-per-step mean|sample); here an "
                        f"[N, D] table is needed: make one from one description per image")
    if table.dim() != 2:
        raise UserError(f"text embeddings {path!r} have shape {tuple(table.shape)}; expected [N, D] "
                        f"as written by description2embedding.py")
    if not table.is_floating_point():
        raise UserError(f"text embeddings {path!r} have dtype {table.dtype}; expected float16 or float32")
    for start in range(0, table.shape[0], chunk_rows):
        rows = table[start:start + chunk_rows].float()
        finite = torch.isfinite(rows).all(dim=1)
        if not finite.all():
            bad = start + (~finite).nonzero()[0].item()
            raise UserError(f"text embeddings {path!r}: row {bad} is not finite; regenerate the table "
                            f"with description2embedding.py (try --dtype float32)")
        norms = rows.norm(dim=1)
        off = (norms - 1).abs() > NORM_TOLERANCE
        if off.any():
            bad = start + off.nonzero()[0].item()
            raise UserError(f"text embeddings {path!r}: row {bad} has norm {norms[bad - start].item():.4f}, "
                            f"not 1; rows must be L2-normalised (description2embedding.py writes them so)")


def load_text_embeddings(path: str, validate: bool = True, flag: str = "--text_emb") -> TextEmbeddings:
    """Memory-map the table at ``path`` (and read ``<path>.json`` when present); validate it.
    ``flag``: the option that named it (--text_emb, or --val-text-emb for the validation set's).

    Raises UserError naming the file and the bad row for a table that is not 2-D, not finite or
    not unit-norm.
    """
    if not os.path.isfile(path):
        fix = "pass --text_emb none for the baseline" if flag == "--text_emb" else f"leave {flag} out"
        raise UserError(f"text embeddings {path!r} ({flag}) do not exist; make them with description2embedding.py "
                        f"or {fix}")
    try:
        table = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read text embeddings {path!r}: {load_error(e, path)} (expected a tensor saved "
                        f"by description2embedding.py)") from None
    if not isinstance(table, torch.Tensor):
        raise UserError(f"text embeddings {path!r} hold a {type(table).__name__}, not a tensor")
    metadata = None
    meta_path = path + ".json"
    if os.path.isfile(meta_path):
        metadata = _read_sidecar(meta_path)
    if validate:
        _validate(table, path)
    embeddings = TextEmbeddings(table, path, metadata)
    embeddings._rows_on_disk = table.shape[0]
    return embeddings


def _read_sidecar(path):
    """The metadata ``<table>.json`` beside a table: a JSON object, else a UserError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot read {path!r} ({type(e).__name__}: {e}); it is the metadata description2embedding.py "
                        f"writes beside the table: regenerate the table, or delete the file to use the table "
                        f"without its file-list check") from None
    if not isinstance(metadata, dict):
        raise UserError(f"{path!r} holds a JSON {type(metadata).__name__}, not an object; regenerate the table with "
                        f"description2embedding.py, or delete the file to use the table without its file-list check")
    return metadata


def _reopen(path, metadata):
    table = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    embeddings = TextEmbeddings(table, path, metadata)
    embeddings._rows_on_disk = table.shape[0]
    return embeddings


def dataset_file_list(dataset: Any) -> list[str] | None:
    """Relative sample paths of an ImageFolder-like dataset (``root`` and ``samples``), else None."""
    samples = getattr(dataset, "samples", None)
    root = getattr(dataset, "root", None)
    if samples is None or root is None:
        return None
    return [os.path.relpath(p, root).replace(os.sep, "/") for p, _ in samples]


class WithTextEmbeddings(torch.utils.data.Dataset):
    """Wrap a map-style dataset of ``(image, target)`` into one of ``(image, target, text_embedding)``,
    where the embedding is row ``index`` of the table (the same index as the image). ``flag`` and
    ``split`` name the table's option and the image folder in messages."""

    def __init__(self, dataset: Any, embeddings: TextEmbeddings, check_files: bool = True, flag: str = "--text_emb",
                 split: str = "train"):
        self.dataset = dataset
        self.embeddings = embeddings
        self.flag, self.split = flag, split
        n, m = len(dataset), len(embeddings)
        if n != m:
            raise UserError(
                f"{flag} {embeddings.path!r} has {m} rows but the {split} set has {n} samples; "
                f"row k must describe sample k, so the table was probably made for another {split} folder "
                f"(images added or removed, or a subset) - regenerate it with description2embedding.py --data")
        if check_files:
            self._check_file_list()

    def _check_file_list(self):
        expected_hash = self.embeddings.metadata.get("file_list_sha256")
        files = dataset_file_list(self.dataset)
        if not expected_hash or files is None or sha256_lines(files) == expected_hash:
            return
        recorded = self.embeddings.file_list()
        where = ""
        if recorded is not None:
            k = next((i for i, (a, b) in enumerate(zip(recorded, files)) if a != b), min(len(recorded), len(files)))
            where = (f" first difference at sample {k}: table has "
                     f"{recorded[k] if k < len(recorded) else '(end)'!r}, "
                     f"folder has {files[k] if k < len(files) else '(end)'!r};")
        raise UserError(f"the {self.split} folder's files differ from those {self.flag} {self.embeddings.path!r} was "
                        f"made for;{where} regenerate the table with description2embedding.py --data <{self.split} "
                        f"folder>")

    def __len__(self):
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:  # a table of several descriptions per image draws per epoch
        if hasattr(self.embeddings, "set_epoch"):
            self.embeddings.set_epoch(epoch)

    def __getitem__(self, index):
        image, target = self.dataset[index]
        return image, target, self.embeddings[index]


class SyntheticTextEmbeddings(TextEmbeddings):
    """A random table of unit rows kept in memory (for runs on generated data)."""

    def __init__(self, num_rows: int, dim: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        table = torch.nn.functional.normalize(torch.randn(num_rows, dim, generator=g), dim=1)
        super().__init__(table, "<generated>", {})
