"""--eval-set NAME=PATH: extra test sets (ImageNet-V2, -ReaL, -R, -A, -Sketch, any folder of training
classes), each scored by its own protocol through the run's exact distributed evaluation: the flags,
the sets built at the start of a run, their scores and log keys (eval_layouts.py reads each set).
"""
from __future__ import annotations

import argparse
import re

import torch
from torch import Tensor

from .data import build_eval_loader
from ..log import logger
from .evaluate import evaluate
from ..errors import UserError
from .eval_layouts import EvalSet, recognise

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
KEY = "evalset_"  # log.txt keys: evalset_<name>_acc1, ema_evalset_<name>_acc1, ...


def add_eval_set_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--eval-set NAME=PATH (repeatable) and --eval-sets-every-epoch."""
    p.add_argument("--eval-set", action="append", default=[], type=eval_set_spec, metavar="NAME=PATH",
                   help="also evaluate on PATH, reported as NAME (repeatable): ImageNet-V2/-Sketch/-R/-A folders, any "
                        "folder of training classes (logits restricted to them), or ReaL's real.json (scores the "
                        "validation folder); after the last epoch, and in -e/--eval runs. README: 'Evaluation sets'")
    p.add_argument("--eval-sets-every-epoch", action="store_true",
                   help="evaluate the --eval-set sets after every epoch, not only after the last")
    return p


def eval_set_spec(text: str) -> str:
    """argparse ``type`` of --eval-set: ``NAME=PATH`` with a plain NAME (it becomes log keys)."""
    name, sep, path = str(text).partition("=")
    if not sep or not NAME.fullmatch(name) or not path:
        raise argparse.ArgumentTypeError(f"must be NAME=PATH with NAME of letters, digits, '.', '_' or '-' "
                                         f"(e.g. v2=/data/imagenetv2-matched-frequency), got {text!r}")
    return str(text)


def run_classes(train_set: object, checkpoint: object = None) -> list[str] | None:
    """The run's class names, in the model's output order: the checkpoint's list when it records one,
    else the training set's (an ImageFolder's sorted folder names); None for generated data."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("classes"), list):
        return checkpoint["classes"]
    classes = getattr(_innermost(train_set), "classes", None)
    return list(classes) if classes is not None else None


def _innermost(dataset):
    """The dataset under our wrappers (text embeddings, corrupt-image skipping)."""
    while hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset


class RestrictedLogits(torch.nn.Module):
    """``model``'s logits at the columns ``indices`` only, in that order: the argmax (and top-5 and
    cross-entropy) among those classes, with targets numbered as the columns."""

    def __init__(self, model: torch.nn.Module, indices: list[int]) -> None:
        super().__init__()
        self.model = model
        self.indices = torch.as_tensor(indices, dtype=torch.long)

    def forward(self, images: Tensor) -> Tensor:
        logits = self.model(images)
        return logits[:, self.indices.to(logits.device)]


class EvalSets:
    """The --eval-set sets of a run, their loaders built; evaluated by ``evaluate_recipe`` (training)
    or ``evaluate`` (one model)."""

    def __init__(self, sets: list[EvalSet], every_epoch: bool = False) -> None:
        self.sets, self.every_epoch = sets, every_epoch

    def due(self, epoch: int, epochs: int) -> bool:
        """Whether the sets are evaluated after ``epoch`` (0-based) of ``epochs``."""
        return self.every_epoch or epoch == epochs - 1

    def evaluate(self, model: torch.nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None,
                 channels_last: bool = False, prepare: object = None, prefix: str = "") -> dict[str, float]:
        """{<prefix>evalset_<name>_acc1 (and _acc5 where defined, _num_images): value} over every set."""
        found = {}
        for s in self.sets:
            scored = model if s.restrict is None else RestrictedLogits(model, s.restrict)
            stats = evaluate(scored, s.loader, device, amp_dtype, channels_last, prepare)
            key = f"{prefix}{KEY}{s.name}"
            found[f"{key}_acc1"] = stats["acc1"]
            if s.top5:
                found[f"{key}_acc5"] = stats["acc5"]
            found[f"{key}_num_images"] = stats["num_images"]
            top5 = f" top-5 {stats['acc5']:.3f}%" if s.top5 else ""
            weights = " (EMA weights)" if prefix else ""
            logger.info(f"eval set {s.name}{weights}: top-1 {stats['acc1']:.3f}%{top5} over {stats['num_images']} "
                        f"images ({s.kind})")
        return found

    def evaluate_recipe(self, recipe: object, device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, float]:
        """Raw weights and, when the recipe keeps one, the EMA (as the validation)."""
        found = self.evaluate(recipe.model, device, amp_dtype, recipe.channels_last, recipe.eval_prepare)
        if recipe.ema is not None:
            found.update(self.evaluate(recipe.ema.module, recipe.ema_device or device, amp_dtype,
                                       prepare=recipe.eval_prepare, prefix="ema_"))
        return found


def sets_in(row: dict) -> dict:
    """The eval-set entries of a log row (or results dict)."""
    return {k: v for k, v in row.items() if k.startswith((KEY, f"ema_{KEY}"))}


def summary(values: dict) -> str:
    """'v2 top-1 61.20% (EMA 61.50%), ...' from a dict with evalset_* keys (results or a log row); '' if none."""
    parts = []
    for key in values:
        if key.startswith(KEY) and key.endswith("_acc1"):
            name = key[len(KEY):-len("_acc1")]
            ema = values.get(f"ema_{key}")
            parts.append(f"{name} top-1 {values[key]:.2f}%" + (f" (EMA {ema:.2f}%)" if ema is not None else ""))
    return ", ".join(parts)


def build_eval_sets(args: argparse.Namespace, classes: list[str] | None, val_set: object, dist_info: object,
                    batch_size: int, workers: int, pin_memory: bool) -> EvalSets | None:
    """The sets of ``args.eval_set`` checked and ready (None without any): every problem is a UserError
    here, at the start of a run, before anything is written."""
    specs = list(getattr(args, "eval_set", None) or [])
    if not specs:
        if getattr(args, "eval_sets_every_epoch", False):
            raise UserError("--eval-sets-every-epoch needs at least one --eval-set NAME=PATH")
        return None
    names = [spec.partition("=")[0] for spec in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"--eval-set name {twice[0]!r} is given more than once; each set needs its own NAME "
                        f"(it names the set's log keys)")
    if not classes:
        raise UserError("--eval-set needs the names of the run's classes to map a set's classes to the model's "
                        "outputs: train or evaluate with --data / --data-path class folders (not generated data), "
                        "or evaluate a checkpoint of this repo that records them")
    sets = []
    for spec in specs:
        name, _, path = spec.partition("=")
        found = recognise(name, path, classes, _innermost(val_set))
        found.loader = build_eval_loader(found.dataset, dist_info, batch_size, workers, pin_memory)
        logger.info(f"eval set {name}: {path} as {found.kind}, {len(found.dataset)} images")
        sets.append(found)
    return EvalSets(sets, getattr(args, "eval_sets_every_epoch", False))


