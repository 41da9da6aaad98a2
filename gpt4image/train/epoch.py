"""One training epoch of both recipes: the steps, the log line, the epoch's sums, stop and checkpoint requests.

Losses, gradient norms and finiteness flags are accumulated on the device and read back only every
``print_freq`` steps, before a checkpoint inside the epoch and at its end, so the host never waits
on the device in between; the per-step values kept since the last read still name the first
non-finite step exactly (guard.py).
"""
import math
import time
from dataclasses import dataclass
from collections.abc import Callable

import torch

from ..log import logger
from .distributed import heartbeat, is_main_process, reduce_sums
from .guard import NonFiniteLoss, StepChecks, StepOutcome
from .resumable import CHECKPOINT, STOP, mix_seed, seed_all
from .step import TrainStep, train_step

__all__ = ["SUM_NAMES", "EpochControl", "EpochStart", "EpochSums", "NonFiniteLoss", "ProgressLine", "Reporting",
           "train_one_epoch"]

# an epoch's sums; also the order of a checkpoint's "partial". The last three (the optimizer steps'
# gradient norms, how many were finite, how many were skipped) are counted on rank 0 only.
SUM_NAMES = ("loss", "ce", "text", "correct", "n", "grad_norm", "grad_steps", "skipped")


def _format_eta(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class EpochSums:
    """Sample-weighted sums of an epoch (SUM_NAMES), kept on the device. ``partial``: the sums over all
    ranks of the steps done before a mid-epoch checkpoint (counted once, on rank 0; a checkpoint of
    an older version has only the first five)."""

    def __init__(self, device: torch.device, partial: list | None = None):
        self.values = torch.zeros(len(SUM_NAMES), device=device, dtype=torch.float64)
        self.main = is_main_process()
        if partial is not None and self.main:
            self.values[:len(partial)] += torch.tensor(partial, dtype=torch.float64, device=device)

    def add(self, losses: torch.Tensor, n: int, correct: torch.Tensor | None) -> None:
        """A batch's [loss, ce, text], size and correct predictions; left out when a loss is not finite
        (a step --nonfinite skip skipped), so the epoch's means stay those of the steps applied."""
        finite = torch.isfinite(losses).all()
        self.values[:3] += torch.where(finite, losses * n, 0.0)
        if correct is not None:
            self.values[3] += torch.where(finite, correct, 0)
        self.values[4] += torch.where(finite, n, 0)

    def add_step(self, outcome: StepOutcome) -> None:
        """An optimizer step: its gradient norm when finite, and whether it was skipped (on rank 0 only:
        every rank steps with the same all-reduced gradient)."""
        if not self.main:
            return
        finite = torch.isfinite(outcome.grad_norm)
        self.values[5] += torch.where(finite, outcome.grad_norm.double(), 0.0)
        self.values[6] += finite
        self.values[7] += outcome.skipped

    def local(self) -> dict:
        return dict(zip(SUM_NAMES, self.values.tolist()))

    def over_all_ranks(self, **extra) -> dict:
        return reduce_sums({**self.local(), **extra}, self.values.device)


@dataclass(kw_only=True)
class Reporting:
    """How training reports: a log line every ``print_freq`` steps, and the same figures (losses and
    mean gradient norm over the steps since the last line, lr, images/s) to ``sink(x, scalars)``
    (TensorBoard, W&B), where x counts the images trained on over all ranks: ``samples_per_step``
    is the global number of images per loader step (batch size x world size)."""
    print_freq: int = 10
    num_epochs: int | None = None
    sink: Callable | None = None
    samples_per_step: int = 1


class ProgressLine:
    """The training log line every ``print_freq`` steps; checks the steps since the last one."""

    def __init__(self, epoch: int, steps: int, start_step: int, reporting: Reporting, step: TrainStep):
        self.epoch, self.steps, self.start_step = epoch, steps, start_step
        self.reporting, self.device = reporting, step.device
        self.total = f"/{reporting.num_epochs}" if reporting.num_epochs else ""
        self.checks = StepChecks(epoch, steps, stop=step.nonfinite == "stop")
        self.started = time.time()
        self.data_time = 0.0
        self.images = 0
        self.text_weight = None  # the alignment's weight in force

    def due(self, step: int, force: bool = False) -> bool:
        return force or (step + 1) % self.reporting.print_freq == 0 or step + 1 == self.steps

    def log(self, step: int, sums: EpochSums, lr: float) -> None:
        recent, grad_norm = self.checks.read()  # raises NonFiniteLoss
        now = time.time()
        rate = self.images / max(now - self.started, 1e-9)
        if self.reporting.sink is not None:
            scalars = dict(zip(("loss", "ce_loss", "text_loss"), recent), lr=lr, images_per_s=rate)
            if math.isfinite(grad_norm):  # none when no optimizer step was taken (or all were skipped) since
                scalars["grad_norm"] = grad_norm
            if self.text_weight is not None:
                scalars["text_weight"] = self.text_weight
            seen = (self.epoch * self.steps + step + 1) * self.reporting.samples_per_step
            self.reporting.sink(seen, {f"step/{k}": v for k, v in scalars.items()})
        done = step + 1 - self.start_step
        cur = sums.local()
        n = max(cur["n"], 1)
        eta = (now - self.started) / done * (self.steps - step - 1)
        memory = f" max mem {torch.cuda.max_memory_allocated(self.device) / 2 ** 20:.0f} MiB" \
            if self.device.type == "cuda" else ""
        logger.info(
            f"epoch {self.epoch}{self.total} [{step + 1}/{self.steps}] loss {cur['loss'] / n:.4f} "
            f"ce {cur['ce'] / n:.4f} text {cur['text'] / n:.4f} lr {lr:.3e} grad norm {grad_norm:.3g} "
            f"img/s {rate:.1f} (per rank) "
            f"data {self.data_time / done:.3f}s eta {_format_eta(eta)}{memory}")


def _take_step(step, batch, index, progress, sums):
    """One loader step of the epoch; returns whether it ended with an optimizer step."""
    epoch, steps = progress.epoch, progress.steps
    update = (index + 1) % step.accum_iter == 0 or index + 1 == steps
    if step.alignment is not None:  # a pure function of the position: the same after a resume
        step.text_weight = progress.text_weight = step.alignment.weight(epoch, index - index % step.accum_iter, steps)
    losses, n, correct = train_step(step, batch, first=index % step.accum_iter == 0, update=update)
    if n:  # an exact accumulation reports its batches together, at the optimizer step
        progress.images += n
        sums.add(losses, n, correct)
    progress.checks.add(index, losses if n else None, step.outcome)
    if step.outcome is not None:
        sums.add_step(step.outcome)
    heartbeat(f"training epoch {epoch}, step {index + 1}")
    return update


@dataclass(kw_only=True)
class EpochStart:
    """Where an epoch starts: ``step`` (in the epoch; the loader starts there) and ``partial``, the
    sums over all ranks of the steps before it (SUM_NAMES; a mid-epoch checkpoint's)."""
    step: int = 0
    partial: list | None = None


@dataclass(kw_only=True)
class EpochControl:
    """Run control inside an epoch: ``ask()`` (a ``RunControl``) is asked after every optimizer step
    and answers CONTINUE, CHECKPOINT or STOP; on CHECKPOINT ``on_checkpoint(step_in_epoch, partial)``
    saves the position."""
    ask: Callable[[], int]
    on_checkpoint: Callable[[int, list], None] | None = None


def train_one_epoch(step: TrainStep, loader, epoch: int, *, start: EpochStart | None = None,
                    control: EpochControl | None = None, seed: int | None = None,
                    reporting: Reporting | None = None) -> dict:
    """Train for one pass over ``loader`` (which starts at ``start.step``); return metrics averaged over
    all ranks: loss, ce_loss, text_loss, acc1 (when targets are hard), lr, images_per_s,
    epoch_time_s, steps, grad_norm (mean over the finite optimizer steps), skipped_steps.

    On a STOP from ``control`` the epoch ends early and the returned dict has ``stopped_at_step``
    and ``partial`` (the epoch's sums so far, over all ranks), which an ``EpochStart`` continues
    exactly. ``seed`` seeds each step's main-process randomness from (seed, epoch, step).
    ``reporting``: a ``Reporting``. The steps since the last read-back are checked before every log
    line and checkpoint (NonFiniteLoss under --nonfinite stop).
    """
    start = start or EpochStart()
    step.model.train()
    steps = start.step + len(loader)
    sums = EpochSums(step.device, start.partial)
    progress = ProgressLine(epoch, steps, start.step, reporting or Reporting(), step)
    lr = step.optimizer.param_groups[0]["lr"]
    index = start.step - 1
    fetch_start = time.time()
    for index, batch in enumerate(loader, start=start.step):
        if seed is not None:
            seed_all(mix_seed(seed, epoch, index, 1), step.device)
        progress.data_time += time.time() - fetch_start
        update = _take_step(step, batch, index, progress, sums)
        action = control.ask() if control is not None and update else None  # positions only between steps
        if progress.due(index, force=action is not None and action >= CHECKPOINT):
            progress.log(index, sums, lr)
        if action == STOP:
            return {"stopped_at_step": index + 1, "partial": _partial(sums), "lr": lr}
        if action == CHECKPOINT and control.on_checkpoint is not None:
            control.on_checkpoint(index + 1, _partial(sums))
        fetch_start = time.time()
    return _epoch_metrics(step, sums, progress, lr, index + 1)


def _epoch_metrics(step, sums, progress, lr, steps_done):
    elapsed = time.time() - progress.started
    totals = sums.over_all_ranks(images_per_s=progress.images / max(elapsed, 1e-9))
    count = max(totals["n"], 1)
    metrics = {"loss": totals["loss"] / count, "ce_loss": totals["ce"] / count, "text_loss": totals["text"] / count,
               "lr": lr, "images_per_s": totals["images_per_s"], "epoch_time_s": elapsed, "steps": steps_done,
               "grad_norm": totals["grad_norm"] / totals["grad_steps"] if totals["grad_steps"] else float("nan"),
               "skipped_steps": int(totals["skipped"])}
    if step.mix_fn is None:
        metrics["acc1"] = 100.0 * totals["correct"] / count
    if step.text_weight is not None:
        metrics["text_weight"] = step.text_weight  # of the epoch's last step
    return metrics


def _partial(sums):
    totals = sums.over_all_ranks()
    return [totals[k] for k in SUM_NAMES]

