"""Exact gradient accumulation for alignment losses with negatives (open_clip's ``accum_freq``).

With ``--accum-iter N`` plain accumulation computes a contrastive loss within each batch: its
negatives are B x W samples, not the N x B x W of the optimizer step. Here every batch first runs
forward without gradients and its projected features are kept; at the step's last batch each
batch runs forward again with gradients and its loss is computed over its fresh features and the
kept features of the other N - 1 batches (gathered across ranks as usual), then backward. Summed
over the N recomputes, the gradient is that of one batch of N x B x W images: each batch's
features get their gradient once, through their own recompute.

What the two passes share, so that the recompute reproduces the kept features exactly:
- the inputs: the batch is moved to the device, prepared (normalised, randomly erased) and mixed
  once, in the first pass, and kept;
- the random state: the generators of the CPU and the device are saved before the first forward
  and restored before the recompute, so dropout and drop-path draw the same masks.
- buffers: the first pass leaves every buffer (BatchNorm running mean, variance and batch count) as
  it found it, so they are updated once per batch, by the recompute, as in plain accumulation. In
  both passes BatchNorm normalises with the statistics of its own batch (B per rank, not N x B), as
  in plain accumulation: the equality with a batch of N x B holds for models without BatchNorm.
The classification loss of each batch is divided by N (the mean over the step's samples); the
alignment loss, already over all of them, is not. Learned loss parameters (SigLIP's temperature and
bias) take their gradient from the last recompute only, so it is counted once.
Cost: one extra forward pass per batch without gradients, and N x B projected features kept.
"""
from dataclasses import dataclass

import torch

from .step import TrainStep, alignment_state, autocast, backward_and_step, no_sync, to_device


@dataclass(kw_only=True)
class _Batch:
    images: torch.Tensor
    targets: torch.Tensor
    labels: torch.Tensor
    text: torch.Tensor
    projected: torch.Tensor
    random_state: tuple


def _random_state(device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_random_state(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def exact_accumulation_step(step: TrainStep, batch, first: bool, update: bool) -> tuple:
    """``train_step`` for a loss with negatives under --accum-iter: the first pass of ``batch``; at
    ``update`` the recomputes, the backward passes and the optimizer step. Returns (None, 0, None)
    until then, and then the step's (values [loss, ce, text] as float64 on the device, images,
    correct top-1 or None) over all its batches, and ``step.outcome`` is the optimizer step's."""
    if first:
        step.optimizer.zero_grad(set_to_none=True)
        step.accumulated = []
    step.accumulated.append(_first_pass(step, batch))
    if not update:
        return None, 0, None
    batches, step.accumulated = step.accumulated, []
    return _recompute(step, batches)


def _first_pass(step, batch):
    device = step.device
    images = to_device(batch[0], device, step.prepare, step.channels_last)
    targets = labels = batch[1].to(device, non_blocking=True)
    text = batch[2].to(device, non_blocking=True)
    if step.mix_fn is not None:
        images, targets, text = step.mix_fn(images, targets, text)
    random_state = _random_state(device)
    buffers = [b.clone() for b in step.model.buffers()]
    with torch.no_grad(), autocast(device, step.amp_dtype):
        _, projected = step.model(images)
    with torch.no_grad():
        for b, saved in zip(step.model.buffers(), buffers):
            b.copy_(saved)
    return _Batch(images=images, targets=targets, labels=labels, text=text, projected=projected.detach(),
                  random_state=random_state)


def _recompute(step, batches):
    device, count = step.device, len(batches)
    text, labels = torch.cat([b.text for b in batches]), torch.cat([b.labels for b in batches])
    state = alignment_state(step.model)
    weight = step.text_weight if step.text_weight is not None else step.alignment.lamb
    ces, text_loss, correct = [], None, None
    for k, b in enumerate(batches):
        last = k == count - 1
        _set_random_state(b.random_state, device)
        with no_sync(step.model, not last):
            with autocast(device, step.amp_dtype):
                logits, projected = step.model(b.images)
                ce = step.criterion(b.images, logits, b.targets)
                features = torch.cat([projected if j == k else other.projected for j, other in enumerate(batches)])
                alignment = step.alignment.loss(features, text, labels, state, live_parameters=last)
                loss = ce / count + weight * alignment
            outcome = backward_and_step(loss, step, last)
        ces.append(ce.detach().float())
        text_loss = alignment.detach().float() if text_loss is None else text_loss
        if step.mix_fn is None and b.targets.dim() == 1:
            first_logits = logits[0] if isinstance(logits, tuple) else logits
            hits = (first_logits.argmax(dim=1) == b.targets).sum()
            correct = hits if correct is None else correct + hits
    if step.ema is not None:
        step.ema.update(step.model)
    step.outcome = outcome
    sizes = torch.tensor([len(b.images) for b in batches], device=device, dtype=torch.float32)
    ce = (torch.stack(ces) * sizes).sum() / sizes.sum()
    values = torch.stack([ce + weight * text_loss, ce, text_loss]).double()
    return values, sum(len(b.images) for b in batches), correct  # the count from the host: no read-back
