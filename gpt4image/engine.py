"""One training step, one training epoch and one exact evaluation, shared by both recipes.

Losses are accumulated on the device and read back only every ``print_freq`` steps, so the host
never waits on the GPU in between; the per-step values kept since the last read still let a
non-finite loss be reported with its exact step and term.
"""
import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .distributed import broadcast_buffers, heartbeat, is_main_process, logger, reduce_sums
from .losses import Alignment
from .resumable import CHECKPOINT, STOP, mix_seed, seed_all

SUM_NAMES = ("loss", "ce", "text", "correct", "n")  # an epoch's sums; also the order of a checkpoint's "partial"


class NonFiniteLoss(RuntimeError):
    pass


def to_device(images, device, prepare=None, channels_last=False):
    images = images.to(device, non_blocking=True)
    if prepare is not None:
        images = prepare(images)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def autocast(device, amp_dtype):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _format_eta(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass
class TrainStep:
    """What one optimisation step uses. ``criterion(images, logits, targets)`` is the classification
    loss; ``alignment`` None trains the baseline (batches then have no third element, the text
    embeddings); ``prepare`` (e.g. DeviceNormalize) turns the loader's uint8 batches into the model's
    input on the device; ``mix_fn(images, targets, text)`` applies Mixup/CutMix."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    criterion: Callable
    device: torch.device
    alignment: Optional[Alignment] = None
    amp_dtype: Optional[torch.dtype] = None
    scaler: Optional[torch.amp.GradScaler] = None
    mix_fn: Optional[Callable] = None
    ema: object = None
    clip_grad: Optional[float] = None
    prepare: Optional[Callable] = None
    channels_last: bool = False


def backward_and_step(loss, optimizer, scaler=None, clip_grad=None, parameters=None):
    """Backward, optional gradient clipping, optimizer step; through the GradScaler when it is enabled."""
    optimizer.zero_grad(set_to_none=True)
    scaling = scaler is not None and scaler.is_enabled()
    (scaler.scale(loss) if scaling else loss).backward()
    if clip_grad is not None:
        if scaling:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
    if scaling:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def train_step(step, batch):
    """One optimisation step on ``batch``; returns (the [loss, ce, text] values as a float64 tensor on
    the device, batch size, correct top-1 predictions or None when the targets are mixed)."""
    device = step.device
    images = to_device(batch[0], device, step.prepare, step.channels_last)
    targets = hard_targets = batch[1].to(device, non_blocking=True)
    text = batch[2].to(device, non_blocking=True) if step.alignment is not None else None
    if step.mix_fn is not None:
        images, targets, text = step.mix_fn(images, targets, text)
    with autocast(device, step.amp_dtype):
        output = step.model(images)
        logits, projected = output if isinstance(output, tuple) and step.alignment is not None else (output, None)
        ce = step.criterion(images, logits, targets)
        if projected is not None:
            text_loss = step.alignment.loss(projected, text)
            loss = ce + step.alignment.lamb * text_loss
        else:
            text_loss, loss = torch.zeros((), device=device), ce
    backward_and_step(loss, step.optimizer, step.scaler, step.clip_grad, step.model.parameters())
    if step.ema is not None:
        step.ema.update(step.model)
    correct = None
    if step.mix_fn is None and hard_targets.dim() == 1:
        first_logits = logits[0] if isinstance(logits, tuple) else logits
        correct = (first_logits.argmax(dim=1) == hard_targets).sum()
    values = torch.stack([loss.detach().float(), ce.detach().float(), text_loss.detach().float()]).double()
    return values, images.shape[0], correct


class EpochSums:
    """Sample-weighted sums of an epoch (SUM_NAMES), kept on the device. ``partial``: the sums over all
    ranks of the steps done before a mid-epoch checkpoint (counted once, on rank 0)."""

    def __init__(self, device, partial=None):
        self.values = torch.zeros(len(SUM_NAMES), device=device, dtype=torch.float64)
        if partial is not None and is_main_process():
            self.values += torch.tensor(partial, dtype=torch.float64, device=device)

    def add(self, losses, n, correct):
        self.values[:3] += losses * n
        if correct is not None:
            self.values[3] += correct
        self.values[4] += n

    def local(self):
        return dict(zip(SUM_NAMES, self.values.tolist()))

    def over_all_ranks(self, **extra):
        return reduce_sums({**self.local(), **extra}, self.values.device)


class ProgressLine:
    """The training log line every ``print_freq`` steps; checks the losses since the last one."""

    def __init__(self, epoch, steps, start_step, print_freq, num_epochs, device):
        self.epoch, self.steps, self.start_step, self.print_freq = epoch, steps, start_step, print_freq
        self.total = f"/{num_epochs}" if num_epochs else ""
        self.device = device
        self.started = time.time()
        self.data_time = 0.0
        self.images = 0
        self.window = []  # per-step [loss, ce, text] since the last read-back

    def due(self, step, force=False):
        return force or (step + 1) % self.print_freq == 0 or step + 1 == self.steps

    def log(self, step, sums, lr):
        _check_finite(self.window, self.epoch, step)
        self.window = []
        now = time.time()
        done = step + 1 - self.start_step
        cur = sums.local()
        n = max(cur["n"], 1)
        eta = (now - self.started) / done * (self.steps - step - 1)
        memory = f" max mem {torch.cuda.max_memory_allocated(self.device) / 2 ** 20:.0f} MiB" \
            if self.device.type == "cuda" else ""
        logger.info(
            f"epoch {self.epoch}{self.total} [{step + 1}/{self.steps}] loss {cur['loss'] / n:.4f} "
            f"ce {cur['ce'] / n:.4f} text {cur['text'] / n:.4f} lr {lr:.3e} "
            f"img/s {self.images / max(now - self.started, 1e-9):.1f} (per rank) "
            f"data {self.data_time / done:.3f}s eta {_format_eta(eta)}{memory}")


def train_one_epoch(step, loader, epoch, *, start_step=0, partial=None, control=None, on_checkpoint=None,
                    seed=None, print_freq=10, num_epochs=None):
    """Train for one pass over ``loader`` (which starts at ``start_step``); return metrics averaged over
    all ranks: loss, ce_loss, text_loss, acc1 (when targets are hard), lr, images_per_s,
    epoch_time_s, steps.

    ``control()`` is asked after every step (a ``RunControl``): on CHECKPOINT,
    ``on_checkpoint(step_in_epoch, partial)`` saves the position; on STOP the epoch ends early and
    the returned dict has ``stopped_at_step`` and ``partial`` (the epoch's sums so far, over all
    ranks), which ``start_step`` and ``partial`` continue exactly. ``seed`` seeds each step's
    main-process randomness from (seed, epoch, step).
    """
    step.model.train()
    steps = start_step + len(loader)
    sums = EpochSums(step.device, partial)
    progress = ProgressLine(epoch, steps, start_step, print_freq, num_epochs, step.device)
    lr = step.optimizer.param_groups[0]["lr"]
    index = start_step - 1
    fetch_start = time.time()
    for index, batch in enumerate(loader, start=start_step):
        if seed is not None:
            seed_all(mix_seed(seed, epoch, index, 1), step.device)
        progress.data_time += time.time() - fetch_start
        losses, n, correct = train_step(step, batch)
        progress.window.append(losses)
        progress.images += n
        sums.add(losses, n, correct)
        heartbeat(f"training epoch {epoch}, step {index + 1}")
        action = control() if control is not None else None
        if progress.due(index, force=action is not None and action >= CHECKPOINT):
            progress.log(index, sums, lr)
        if action == STOP:
            return {"stopped_at_step": index + 1, "partial": _partial(sums), "lr": lr}
        if action == CHECKPOINT and on_checkpoint is not None:
            on_checkpoint(index + 1, _partial(sums))
        fetch_start = time.time()
    elapsed = time.time() - progress.started
    totals = sums.over_all_ranks(images_per_s=progress.images / max(elapsed, 1e-9))
    count = max(totals["n"], 1)
    metrics = {"loss": totals["loss"] / count, "ce_loss": totals["ce"] / count, "text_loss": totals["text"] / count,
               "lr": lr, "images_per_s": totals["images_per_s"], "epoch_time_s": elapsed, "steps": index + 1}
    if step.mix_fn is None:
        metrics["acc1"] = 100.0 * totals["correct"] / count
    return metrics


def _partial(sums):
    totals = sums.over_all_ranks()
    return [totals[k] for k in SUM_NAMES]


def _check_finite(window, epoch, step):
    if not window:
        return
    values = torch.stack(window).cpu()
    bad = ~torch.isfinite(values)
    if bad.any():
        row, col = bad.nonzero()[0].tolist()
        term = ["total", "classification", "text alignment"][col]
        first_step = step - len(window) + 1 + row
        raise NonFiniteLoss(f"non-finite {term} loss ({values[row, col].item()}) at epoch {epoch}, step {first_step}; "
                            f"the run stops here and the last checkpoint is kept as it was")


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype=None, channels_last=False, prepare=None):
    """Top-1/top-5 and cross-entropy over exactly the samples of ``loader`` on every rank (use
    ExactDistributedSampler and the model without DDP), reduced by sample count.

    Every rank first takes rank 0's buffers (BatchNorm statistics, which each rank's last training
    step left different), so the figures are those of the weights rank 0 saves."""
    broadcast_buffers(model)
    model.eval()
    stats = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top1, top5, n
    for batch in loader:
        images, targets = to_device(batch[0], device, prepare, channels_last), batch[1].to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        stats[0] += torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == targets[:, None]
        stats[1] += hits[:, 0].sum()
        stats[2] += hits.any(dim=1).sum()
        stats[3] += len(targets)
        heartbeat("an evaluation batch")
    totals = reduce_sums(dict(zip(["loss", "top1", "top5", "n"], stats.tolist())), device)
    n = max(totals["n"], 1)
    return {"loss": totals["loss"] / n, "acc1": 100.0 * totals["top1"] / n, "acc5": 100.0 * totals["top5"] / n,
            "num_images": int(totals["n"])}
