"""Schedules of the text-alignment weight lambda, and the alignment flags of both recipes.

The weight is a pure function of the position in training (epoch, or epoch and step), so a resumed
run uses the same weights as an uninterrupted one. Schedules as TextTeacher (arXiv 2605.22098)
defines them, with w = --lamb and E = --epochs:

    const          w
    linear         w (E - e) / E
    cosine         w cos(pi e / 2E)                      (TextTeacher's ``cos``)
    warmup:A       w min(1, e / A)                       (0 at the start, w from epoch A on)
    jump:A-B-R     w until epoch A, linearly to R w at epoch B, R w after (TextTeacher's ``jump``)

``e`` is the epoch (``--text-weight-every epoch``, the default: one weight per epoch, as TextTeacher)
or the epoch plus the fraction of it done at the start of the optimizer step (``step``).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from ..errors import UserError
from .losses import LOSS_TYPES, LOSSES

SCHEDULES = ("const", "linear", "cosine", "warmup:A", "jump:A-B-R")


@dataclass(frozen=True, kw_only=True)
class TextWeightSchedule:
    """A parsed --text-weight-schedule: its ``kind``, parameters and the ``every`` of its position."""
    kind: str
    epochs: int
    every: str = "epoch"
    params: tuple = ()

    def position(self, epoch: int, step: int, steps: int) -> float:
        """The schedule's e at ``step`` of ``steps`` in ``epoch``."""
        return float(epoch) if self.every == "epoch" else epoch + step / max(steps, 1)

    def weight(self, w: float, epoch: int, step: int = 0, steps: int = 1) -> float:
        """lambda at ``step`` (of ``steps``) of ``epoch``."""
        e, end = self.position(epoch, step, steps), self.epochs
        if self.kind == "const":
            return w
        if self.kind == "linear":
            return w * (end - e) / end
        if self.kind == "cosine":
            return w * math.cos(math.pi * e / (2 * end))
        if self.kind == "warmup":
            return w * min(1.0, e / self.params[0])
        a, b, r = self.params  # jump
        if e <= a:
            return w
        if e >= b:
            return r * w
        return w + (r - 1) * w * (e - a) / (b - a)

    def describe(self) -> str:
        """'jump:30-60-0.1 per epoch over 90 epochs'."""
        spec = self.kind + (":" + "-".join(f"{p:g}" for p in self.params) if self.params else "")
        return f"{spec} per {self.every} over {self.epochs} epochs"


def _numbers(spec, text, count):
    parts = text.split("-") if count > 1 else [text]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != count or not all(math.isfinite(v) and v >= 0 for v in values):
        raise UserError(f"--text-weight-schedule {spec!r}: expected {count} number(s) >= 0 after the colon "
                        f"(e.g. warmup:5, jump:30-60-0.1)")
    return values


def parse_schedule(spec: str, epochs: int, every: str = "epoch") -> TextWeightSchedule:
    """A TextWeightSchedule from ``--text-weight-schedule`` (see the module docstring)."""
    name, _, rest = str(spec).partition(":")
    if name in ("const", "linear", "cosine") and not rest:
        return TextWeightSchedule(kind=name, epochs=epochs, every=every)
    if name == "warmup":
        (length,) = _numbers(spec, rest, 1)
        if length <= 0:
            raise UserError(f"--text-weight-schedule {spec!r}: the warm-up needs a length > 0 epochs")
        return TextWeightSchedule(kind=name, epochs=epochs, every=every, params=(length,))
    if name == "jump":
        a, b, r = _numbers(spec, rest, 3)
        if a > b:
            raise UserError(f"--text-weight-schedule {spec!r}: the jump starts at epoch {a:g} after it ends at "
                            f"{b:g}; give jump:A-B-R with A <= B")
        return TextWeightSchedule(kind=name, epochs=epochs, every=every, params=(a, b, r))
    raise UserError(f"--text-weight-schedule {spec!r} is not a schedule; use one of {', '.join(SCHEDULES)}")


def add_alignment_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The alignment-loss flags both recipes share (besides --loss_type, --lamb, --tau)."""
    p.add_argument("--text-weight-schedule", default="const", metavar="SCHEDULE",
                   help="weight of the text loss over training, with w = --lamb and E = --epochs: const (default), "
                        "linear w(E-e)/E, cosine w cos(pi e/2E), warmup:A (0 to w over A epochs), jump:A-B-R (w until "
                        "epoch A, linearly to R w at epoch B); the weight in force is in log.txt and TensorBoard")
    p.add_argument("--text-weight-every", choices=["epoch", "step"], default="epoch",
                   help="the schedule's e: the epoch (default), or the epoch plus the fraction done at each step")
    p.add_argument("--text-emb-standardize", action="store_true",
                   help="standardise the text rows per dimension (mean and std of the training table, computed "
                        "once and kept in the checkpoint) before the loss; rows renormalised for the losses that "
                        "compare directions")
    p.add_argument("--accum-alignment", choices=["exact", "per-batch"], default="exact",
                   help="with --accum-iter N, a loss with negatives sees all N x W x B samples of the optimizer step "
                        "(exact: a no-grad pass caches the features, each batch is then recomputed with gradients) "
                        "or only each batch x W (per-batch: no second forward)")
    return p


def check_alignment_args(args: argparse.Namespace) -> TextWeightSchedule:
    """Refuse combinations that cannot work, before anything is written; the run's weight schedule."""
    baseline = str(getattr(args, "text_emb", "")).lower() == "none"
    if args.text_emb_standardize and baseline:
        raise UserError("--text-emb-standardize standardises the text embeddings, but --text_emb none trains the "
                        "baseline without any; drop one of the two")
    if args.loss_type not in LOSSES:
        raise UserError(f"--loss_type {args.loss_type!r} is not a loss; use one of {', '.join(LOSS_TYPES)}")
    if args.local_loss and args.loss_type != "clip":
        raise UserError(f"--local-loss is implemented for the clip loss only, not --loss_type {args.loss_type}")
    if LOSSES[args.loss_type].needs_labels and getattr(args, "mix_text", False):
        raise UserError(f"--loss_type {args.loss_type} takes its positives from each image's class, but --mix-text "
                        f"mixes the text targets of two images, which then belong to no single class; drop --mix-text")
    return parse_schedule(args.text_weight_schedule, args.epochs, args.text_weight_every)
