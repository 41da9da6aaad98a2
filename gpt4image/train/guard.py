"""The finiteness guard of the optimizer step and the gradient norm, without a host synchronisation per step.

Every optimizer step computes the total L2 norm of the gradients it steps with (unscaled under a
GradScaler, before clipping; with --clip-grad it is the norm clip_grad_norm_ returns) and whether
the step's loss or that norm is non-finite, all on the device. ``--nonfinite``:

- ``stop`` (default): the step is taken as before (nothing about it changes) and the flags are
  kept; the host reads them only where it reads anyway (the log line every --print-freq steps),
  before every checkpoint inside an epoch and at the end of the epoch. The first non-finite step
  raises ``NonFiniteLoss`` naming its epoch, step and term, so no checkpoint is written from
  the weights it made non-finite.
- ``skip``: a step whose gradient is non-finite (which a non-finite loss makes it) is not applied
  (weights and optimizer state, step count included, stay as they were) and is counted; the
  decision is the same on every rank, whose gradients are all-reduced. With an optimizer that
  takes ``found_inf`` on the device (PyTorch's fused SGD, Adam and AdamW: what GradScaler uses),
  nothing waits for the device; with any other optimizer the flag is read once per step (one host
  synchronisation per step). What a skipped step still does: the forward pass has updated
  BatchNorm's running statistics, and the EMA takes its step towards the unchanged weights (as it
  does after a GradScaler skip). A batch with a non-finite loss is left out of the epoch's means.

Under float16 autocast the GradScaler already skips steps whose scaled gradient overflows (and
lowers its scale): those are counted as skipped and never stop the run; only a non-finite loss does.
"""
import math
from dataclasses import dataclass
from collections.abc import Iterable

import torch

NONFINITE_CHOICES = ("stop", "skip")
LOSS_TERMS = ("total loss", "classification loss", "text alignment loss")


class NonFiniteLoss(RuntimeError):
    """A non-finite loss or gradient under --nonfinite stop; the message names epoch, step and term."""


def add_guard_args(p) -> None:
    """--nonfinite: what a non-finite loss or gradient does."""
    p.add_argument("--nonfinite", choices=NONFINITE_CHOICES, default="stop",
                   help="a non-finite loss or gradient: 'stop' the run at the next log line or checkpoint, naming the "
                        "step (no checkpoint is written from its weights), or 'skip' the optimizer step and count it "
                        "(log.txt train_skipped_steps; fused SGD/Adam/AdamW skip on the device, other optimizers "
                        "read one flag per step); float16's GradScaler skips overflowing steps either way")


@dataclass(kw_only=True)
class StepOutcome:
    """An optimizer step, on the device: its gradient norm, whether that was non-finite (``bad``),
    whether the step was not applied (``skipped``), and whether a non-finite gradient is an error
    (not under a GradScaler, whose overflows are routine)."""
    grad_norm: torch.Tensor
    bad: torch.Tensor
    skipped: torch.Tensor
    check_gradient: bool = True


def total_grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The L2 norm of all gradients of ``parameters`` together (what clip_grad_norm_ computes), unchanged."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, 2.0)


def unscaled_grad_norm(parameters: list, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                       clip_grad: float | None) -> torch.Tensor:
    """The norm of the gradients ``optimizer`` steps with, before clipping; clips with ``clip_grad``.
    ``scaler``: an enabled GradScaler. Its unscale_ is what scaler.step would call itself, so the
    step is unchanged; a fused optimizer unscales inside its step, so the norm is divided instead."""
    if clip_grad is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        return torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
    if scaler is None:
        return total_grad_norm(parameters)
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        return total_grad_norm(parameters) / scaler._get_scale_async().float()
    scaler.unscale_(optimizer)
    return total_grad_norm(parameters)


def guarded_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, bad: torch.Tensor,
                 nonfinite: str = "stop") -> torch.Tensor:
    """The optimizer step; returns whether it was skipped (a bool tensor on the device)."""
    if scaler is not None:  # skips a non-finite (scaled) gradient itself
        scaler.step(optimizer)
        scaler.update()
        return bad
    if nonfinite != "skip":
        optimizer.step()
        return torch.zeros_like(bad)
    if getattr(optimizer, "_step_supports_amp_scaling", False):  # fused: skips on the device (as under GradScaler)
        optimizer.found_inf, optimizer.grad_scale = bad.float(), None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
    elif not bad.item():  # one host read per step: the optimizer cannot skip by itself
        optimizer.step()
    return bad


class StepChecks:
    """The losses of the loader steps and the outcomes of the optimizer steps since the last
    read-back, kept on the device; ``read`` brings them to the host in one transfer and, with
    ``stop``, raises NonFiniteLoss at the first non-finite one that was not skipped."""

    def __init__(self, epoch: int, steps: int, stop: bool = True):
        self.epoch, self.steps, self.stop = epoch, steps, stop
        self.loss_steps, self.losses = [], []  # per loader step: [loss, ce, text]
        self.norm_steps, self.outcomes = [], []

    def add(self, index: int, losses: torch.Tensor | None, outcome: StepOutcome | None) -> None:
        if losses is not None:
            self.loss_steps.append(index)
            self.losses.append(losses)
        if outcome is not None:
            self.norm_steps.append(index)
            self.outcomes.append(outcome)

    def read(self) -> tuple:
        """(mean [loss, ce, text] over the loader steps, mean finite gradient norm over the optimizer
        steps; NaN where there are none) since the last read."""
        parts = [torch.stack(self.losses).double().flatten()] if self.losses else []
        parts += [torch.stack([torch.stack([o.grad_norm.double().reshape(()), o.skipped.double().reshape(())])
                               for o in self.outcomes]).flatten()] if self.outcomes else []
        values = torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=torch.float64)
        losses = values[:3 * len(self.losses)].reshape(-1, 3)
        norms = values[3 * len(self.losses):].reshape(-1, 2)
        if self.stop:
            self._check(losses, norms)
        self.loss_steps, self.losses, self.norm_steps, self.outcomes = [], [], [], []
        finite = norms[:, 0][torch.isfinite(norms[:, 0])]
        loss_mean = losses.mean(dim=0).tolist() if len(losses) else [float("nan")] * 3
        return loss_mean, finite.mean().item() if len(finite) else float("nan")

    def _check(self, losses: torch.Tensor, norms: torch.Tensor) -> None:
        found = []  # (loader step, term, value)
        for row, index in zip(losses, self.loss_steps):
            bad = (~torch.isfinite(row)).nonzero().flatten()
            if len(bad):
                found.append((index, LOSS_TERMS[int(bad[0])], row[int(bad[0])].item()))
        for (norm, skipped), index, outcome in zip(norms.tolist(), self.norm_steps, self.outcomes):
            if outcome.check_gradient and not skipped and not math.isfinite(norm):
                found.append((index, "gradient (total norm)", norm))
        if found:
            index, term, value = min(found, key=lambda f: f[0])
            raise NonFiniteLoss(f"non-finite {term} ({value}) at epoch {self.epoch}, step {index + 1}/{self.steps}; "
                                f"the run stops here, before any checkpoint of these weights")
