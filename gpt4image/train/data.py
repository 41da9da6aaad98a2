"""What the recipes read: image folders (or generated images) paired with their text embeddings,
and the loaders over them (resumable training order, exact distributed evaluation)."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..log import logger
from ..errors import UserError
from ..io import refuse_repeated_dirs
from .resumable import ResumableSampler, SeededSamples, ignore_stop_signals
from .distributed import DistInfo
from .samplers import ExactDistributedSampler
from ..text.tables import SyntheticTextEmbeddings, TextEmbeddings, WithTextEmbeddings, load_text_embeddings
from .text_per_step import keep_described, load_training_table
from .text_targets import TrainingTargets, attach_training_targets


class DeviceNormalize:
    """uint8 batches (B, C, H, W) from the loader -> float32 in [0, 1], normalised, on their device.

    The same operations as torchvision's ToTensor + Normalize (so the same numbers, bit for bit), done
    once per batch after the host-to-device copy: the loader workers skip the float conversion, and
    collation, pinned memory and the copy move a quarter of the bytes.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: Tensor) -> Tensor:
        if self.mean.device != images.device:
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        return images.float().div_(255).sub_(self.mean).div_(self.std)


def build_train_loader(dataset: Dataset, sampler: Sampler, batch_size: int, num_workers: int, pin_memory: bool,
                       seed: int) -> tuple[DataLoader, ResumableSampler]:
    """Loader whose order and augmentation are reproducible and resumable inside an epoch.

    Returns (loader, resumable sampler): call ``sampler.set_epoch(epoch, start_position)``."""
    resumable = ResumableSampler(sampler)
    loader = torch.utils.data.DataLoader(SeededSamples(dataset, seed), batch_size=batch_size, sampler=resumable,
                                         num_workers=num_workers, pin_memory=pin_memory, drop_last=True,
                                         persistent_workers=num_workers > 0, worker_init_fn=ignore_stop_signals)
    return loader, resumable


def build_eval_loader(dataset: Dataset, dist_info: DistInfo, batch_size: int, num_workers: int,
                      pin_memory: bool) -> DataLoader:
    """Loader visiting each validation sample exactly once over all ranks (evaluate without DDP).

    Its workers persist: forking new ones every epoch from a process whose threads (gloo,
    TensorBoard, the training loader) may hold a lock can deadlock the child (CPython gh-112275).
    They are capped at this process's share of the machine's cores (they idle while training)."""
    sampler = ExactDistributedSampler(dataset, dist_info.rank, dist_info.world_size)
    per_process = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    num_workers = min(num_workers, per_process)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       pin_memory=pin_memory, worker_init_fn=ignore_stop_signals,
                                       persistent_workers=num_workers > 0)


def load_image(path: str) -> object:
    """The image as 8-bit RGB (``images.open_rgb``: RGB files used as decoded, 16-bit and float
    greyscale scaled, transparency over white); a file that cannot be decoded or whose mode is
    refused is a UserError that names it."""
    from ..images import open_rgb
    try:
        return open_rgb(path)
    except Exception as e:  # noqa: BLE001  OSError, SyntaxError, DecompressionBombError, ...: the file's problem
        raise UserError(f"cannot decode image {path} ({type(e).__name__}: {e}); replace or delete the file, "
                        f"or pass --skip-corrupt-images") from None


class SkipCorrupt(torch.utils.data.Dataset):
    """With --skip-corrupt-images: a sample whose image cannot be decoded is replaced by the next
    good one (image, target and text embedding together, so pairs stay intact); counted in
    ``skipped``, shared by all loader workers."""

    def __init__(self, dataset: Dataset) -> None:
        import multiprocessing
        self.dataset = dataset
        self.skipped = multiprocessing.Value("i", 0)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Passed on to the dataset below (its per-epoch text draw)."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> tuple:
        for offset in range(len(self.dataset)):
            try:
                return self.dataset[(index + offset) % len(self.dataset)]
            except UserError as e:
                with self.skipped.get_lock():
                    self.skipped.value += 1
                logger.warning(f"skipping: {e}")
        raise UserError("no image of the training set can be decoded")


def build_image_folders(root: str, train_transform: Callable | None,
                        val_transform: Callable | None) -> tuple[Dataset, Dataset]:
    """``root/train`` and ``root/val`` as ImageFolders, refusing a missing split or differing classes."""
    import torchvision
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise UserError(f"{os.path.join(root, split)!r} does not exist; --data must hold train/ and val/ "
                            f"folders with one sub-folder per class")
    for split in ("train", "val"):
        refuse_repeated_dirs(os.path.join(root, split))
    try:
        train = torchvision.datasets.ImageFolder(os.path.join(root, "train"), train_transform, loader=load_image)
        val = torchvision.datasets.ImageFolder(os.path.join(root, "val"), val_transform, loader=load_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"cannot read the image folders under {root!r}: {e}") from None
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))[:3]
        only_val = sorted(set(val.classes) - set(train.classes))[:3]
        raise UserError(f"{root}: train has {len(train.classes)} classes and val {len(val.classes)}, and they differ "
                        f"(only in train: {only_train}, only in val: {only_val}); "
                        f"both splits need the same class folders")
    return train, val


def generated_datasets(num_classes: int, input_size: int, train_size: int, val_size: int,
                       train_transform: Callable | None, val_transform: Callable | None) -> tuple[Dataset, Dataset]:
    """Random-image datasets (as the original's FakeData) for a run without --data."""
    import torchvision
    size = (3, input_size, input_size)
    train = torchvision.datasets.FakeData(train_size, size, num_classes, train_transform, random_offset=0)
    val = torchvision.datasets.FakeData(val_size, size, num_classes, val_transform, random_offset=10 ** 6)
    return train, val


def attach_val_text_embeddings(val: Dataset, path: str | None, train_embeddings: TextEmbeddings | None) -> Dataset:
    """--val-text-emb: the validation set with its descriptions' embeddings (row k for image k of the
    val folder, made by the same two tools), for evaluation's retrieval figures."""
    if not path:
        return val
    if train_embeddings is None:
        raise UserError("--val-text-emb measures the text alignment, so it needs a training run with --text_emb "
                        "(not a baseline or an evaluation)")
    embeddings = load_text_embeddings(path, flag="--val-text-emb")
    if embeddings.dim != train_embeddings.dim:
        raise UserError(f"--val-text-emb {path!r} has {embeddings.dim}-d rows "
                        f"but --text_emb has {train_embeddings.dim}-d; "
                        f"make both with the same encoder")
    return WithTextEmbeddings(val, embeddings, flag="--val-text-emb", split="val")


def attach_text_embeddings(train: Dataset, text_emb: str | None, generated: bool, text_per_step: str | None = None,
                           seed: int = 0, targets: TrainingTargets | None = None) -> tuple[Dataset, object]:
    """Return (dataset yielding (image, target, embedding), TextEmbeddings) or (train, None).

    ``text_per_step``: how an [N, K, D] table's K descriptions become one (gpt4image.train.text_per_step).
    ``targets`` (text_targets.TrainingTargets): another text target, noisy or fewer labels; the
    paper's choices keep this function's own path unchanged."""
    if targets is not None and not targets.released:
        if text_per_step is not None:
            raise UserError(f"--text-per-step {text_per_step} (an [N, K, D] table) cannot be combined with "
                            f"--text-target, --label-noise, --train-fraction or --shots yet; average the K "
                            f"descriptions into an [N, D] table, or train without those flags")
        return attach_training_targets(train, text_emb, generated, targets)
    if text_emb is None or str(text_emb).lower() == "none":
        if text_emb is not None and text_per_step is not None:
            raise UserError(f"--text-per-step {text_per_step} chooses among the descriptions of a text table, but "
                            f"--text_emb none trains the baseline without one; drop one of the two")
        return train, None
    if generated and not os.path.isfile(text_emb):
        embeddings = SyntheticTextEmbeddings(len(train), 1024)
        logger.info(f"generated data: random {len(train)} x 1024 text embeddings (no file {text_emb!r} needed)")
    else:
        embeddings = load_training_table(text_emb, text_per_step, seed)
        train = keep_described(train, embeddings)
    return WithTextEmbeddings(train, embeddings), embeddings
