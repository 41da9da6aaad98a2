"""The text-alignment settings of a run (``Alignment``) and the log line that states them."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .alignment_state import AlignmentState
from .losses import LOSSES, alignment_loss


@dataclass(frozen=True)
class Alignment:
    """The text-alignment settings of a run: ``loss(projected, text)`` is ``alignment_loss`` with them.

    ``schedule`` (a ``TextWeightSchedule`` or None: constant ``lamb``) gives the weight in force;
    ``exact_accumulation``: under --accum-iter a loss with negatives sees every accumulated batch."""
    loss_type: str = "clip"
    tau: float = 0.2
    lamb: float = 0.3
    gather_with_grad: bool = False
    local_loss: bool = False
    schedule: object = None
    exact_accumulation: bool = True
    shared_targets: bool = False

    @property
    def negatives(self) -> bool:
        return LOSSES[self.loss_type].negatives

    def loss(self, image_features: Tensor, text_embeddings: Tensor, labels: Tensor | None = None,
             state: AlignmentState | None = None, live_parameters: bool = True) -> Tensor:
        """``state``: the model's ``AlignmentState`` (standardisation, SigLIP's parameters), or None."""
        extra = {}
        if state is not None:
            if state.standardize:
                text_embeddings = state.standardized(text_embeddings, LOSSES[self.loss_type].unit_text)
            extra = state.loss_parameters(live_parameters)
        return alignment_loss(image_features, text_embeddings, self.loss_type, self.tau,
                              gather_with_grad=self.gather_with_grad, local_loss=self.local_loss, labels=labels,
                              shared_targets=self.shared_targets, **extra)

    def weight(self, epoch: int, step: int = 0, steps: int = 1) -> float:
        """The weight of the text loss at ``step`` of ``steps`` in ``epoch``."""
        return self.lamb if self.schedule is None else self.schedule.weight(self.lamb, epoch, step, steps)

    def describe(self, world_size: int) -> str:
        """describe_alignment's line, with the weight schedule when it is not constant."""
        line = describe_alignment(self.loss_type, self.tau, self.lamb, self.gather_with_grad, self.local_loss,
                                  world_size)
        scheduled = self.schedule is not None and self.schedule.kind != "const"
        return line + (f"; weight schedule {self.schedule.describe()}" if scheduled else "")


def effective_text_weight(lamb: float, loss_type: str, gather_with_grad: bool, world_size: int) -> float:
    """Weight of the global-batch text loss that reaches the weights after DDP's gradient averaging."""
    if LOSSES[loss_type].negatives and not gather_with_grad and world_size > 1:
        return lamb / world_size
    return lamb


def describe_alignment(loss_type: str, tau: float, lamb: float, gather_with_grad: bool, local_loss: bool,
                       world_size: int) -> str:
    """One log line stating the alignment setup and its effective weight."""
    if not LOSSES[loss_type].negatives:
        mode = "local batch (no gather)"
    elif world_size == 1:
        mode = "single process"
    elif gather_with_grad:
        mode = "gather with grad" + (", local loss" if local_loss else "")
    else:
        mode = "released gather (own slice only carries gradient)"
    weight = effective_text_weight(lamb, loss_type, gather_with_grad, world_size)
    return (f"text alignment: loss={loss_type} tau={tau} lamb={lamb} gather={mode} world_size={world_size} "
            f"effective text-loss weight={weight:g}")
