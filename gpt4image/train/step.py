"""One training step of both recipes: forward, backward and the guarded optimizer step (guard.py)."""
import contextlib
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable

import torch

from .guard import NONFINITE_CHOICES, StepOutcome, guarded_step, unscaled_grad_norm
from .alignment import Alignment


def to_device(images: torch.Tensor, device: torch.device, prepare: Callable | None = None,
              channels_last: bool = False) -> torch.Tensor:
    """The loader's batch on ``device``, through ``prepare`` and in channels-last memory if asked."""
    images = images.to(device, non_blocking=True)
    if prepare is not None:
        images = prepare(images)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast in ``amp_dtype`` on ``device``; nothing when it is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


@dataclass(kw_only=True)
class TrainStep:
    """What one optimisation step uses. ``criterion(images, logits, targets)`` is the classification
    loss; ``alignment`` None trains the baseline (batches then have no third element, the text
    embeddings); ``prepare`` (e.g. DeviceNormalize) turns the loader's uint8 batches into the model's
    input on the device; ``mix_fn(images, targets, text)`` applies Mixup/CutMix; ``nonfinite``:
    --nonfinite (guard.py)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    criterion: Callable
    device: torch.device
    alignment: Alignment | None = None
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    mix_fn: Callable | None = None
    ema: object = None
    clip_grad: float | None = None
    prepare: Callable | None = None
    channels_last: bool = False
    accum_iter: int = 1  # batches whose gradients are summed before each optimizer step
    nonfinite: str = "stop"
    text_weight: float | None = None  # the alignment's weight in force (train_one_epoch sets it); None: lamb
    accumulated: list = field(default_factory=list)  # the kept batches of an exact accumulation
    outcome: StepOutcome | None = None  # of the last optimizer step (train_step sets it; None between steps)

    def __post_init__(self) -> None:
        if self.nonfinite not in NONFINITE_CHOICES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_CHOICES}, not {self.nonfinite!r}")

    @property
    def exact_accumulation(self) -> bool:
        """A loss with negatives over all N accumulated batches (see accumulation.py)."""
        a = self.alignment
        return self.accum_iter > 1 and a is not None and a.exact_accumulation and a.negatives

    @property
    def scaling(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()


def backward_and_step(loss: torch.Tensor, step: TrainStep, update: bool = True,
                      parameters: Iterable | None = None) -> StepOutcome | None:
    """Backward, then (``update``) the gradient norm, optional clipping and the guarded optimizer
    step, through the GradScaler when it is enabled; returns the step's outcome. Without ``update``
    the gradient accumulates for a later step (and None is returned)."""
    scaler = step.scaler if step.scaling else None
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if not update:
        return None
    parameters = list(step.model.parameters() if parameters is None else parameters)
    norm = unscaled_grad_norm(parameters, step.optimizer, scaler, step.clip_grad).to(loss.device)
    bad = ~torch.isfinite(norm)  # the same on every rank (all-reduced gradients); a non-finite loss makes it so
    skipped = guarded_step(step.optimizer, scaler, bad, step.nonfinite)
    return StepOutcome(grad_norm=norm, bad=bad, skipped=skipped, check_gradient=scaler is None)


def alignment_state(model: torch.nn.Module) -> torch.nn.Module | None:
    """The alignment loss's state (losses.AlignmentState) of ``model``, under torch.compile and DDP; or None."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "alignment_state", None)


def no_sync(model: torch.nn.Module, accumulating: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync while gradients accumulate (no all-reduce until the batch that steps)."""
    ddp = getattr(model, "_orig_mod", model)  # under torch.compile
    if accumulating and isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        return ddp.no_sync()
    return contextlib.nullcontext()


def train_step(step: TrainStep, batch, first: bool = True, update: bool = True) -> tuple:
    """Forward and backward of ``batch``, and (``update``) the optimizer step: with --accum-iter N a
    step's batch is N batches, ``first`` starting it and ``update`` ending it. Returns (the
    [loss, ce, text] values as a float64 tensor on the device, batch size, correct top-1 predictions
    or None when the targets are mixed); ``step.outcome`` is the optimizer step's (None without one)."""
    step.outcome = None
    if step.exact_accumulation:
        from .accumulation import exact_accumulation_step
        return exact_accumulation_step(step, batch, first, update)
    if first:
        step.optimizer.zero_grad(set_to_none=True)
    with no_sync(step.model, not update):
        values, n, correct = _forward_backward(step, batch, update)
    if update and step.ema is not None:
        step.ema.update(step.model)
    return values, n, correct


def _forward_backward(step, batch, update):
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
            text_loss = step.alignment.loss(projected, text, hard_targets, alignment_state(step.model))
            loss = ce + (step.alignment.lamb if step.text_weight is None else step.text_weight) * text_loss
        else:
            text_loss, loss = torch.zeros((), device=device), ce
    step.outcome = backward_and_step(loss / step.accum_iter if step.accum_iter > 1 else loss, step, update)
    correct = None
    if step.mix_fn is None and hard_targets.dim() == 1:
        first_logits = logits[0] if isinstance(logits, tuple) else logits
        correct = (first_logits.argmax(dim=1) == hard_targets).sum()
    values = torch.stack([loss.detach().float(), ce.detach().float(), text_loss.detach().float()]).double()
    return values, images.shape[0], correct
