"""Alignment losses between projected image features and stored CLIP text embeddings (arXiv 2306.00693).

With one process (or no process group) nothing here makes a distributed call.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

LOSS_TYPES = ("clip", "ctr", "byol")


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns to each rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.batch = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # gloo has no reduce_scatter; the gradient is tiny (W*B x D)
        return grad[ctx.rank * ctx.batch:(ctx.rank + 1) * ctx.batch]


def gather_features(x, gather_with_grad=False):
    """Concatenate ``x`` [B, D] of every rank into [W*B, D] (all ranks must pass the same B).

    Without ``gather_with_grad`` only this rank's slice carries gradient (the released behaviour);
    with it, gradients flow back to the rank that produced each slice.
    """
    rank, world = _world()
    if world == 1:
        return x
    if gather_with_grad:
        return _GatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts)


_label_cache = {}


def _arange(n, device, offset=0):
    key = (n, offset, device)
    if key not in _label_cache:
        _label_cache[key] = torch.arange(offset, offset + n, device=device)
    return _label_cache[key]


def identical_rows(rows, columns):
    """[R, C] bool: row i of ``rows`` equals row j of ``columns`` exactly ([R, D] and [C, D], any float dtype)."""
    both = torch.cat([rows, columns])
    ids = torch.unique(both, dim=0, return_inverse=True)[1]
    return ids[:len(rows), None] == ids[None, len(rows):]


def contrastive_cross_entropy(logits, labels, positives=None):
    """Mean over rows of the InfoNCE cross-entropy of ``logits`` [R, C] with target column ``labels[r]``;
    with ``positives`` ([R, C] bool, shared targets), of -log of the softmax mass on the row's positive
    columns (SupCon's L_in): any positive may take it. (SupCon's L_out, the mean of -log softmax over
    the positives, equals the plain cross-entropy summed over a group of identical rows: no change.)"""
    if positives is None:
        return F.cross_entropy(logits, labels)
    on_positives = torch.logsumexp(logits.masked_fill(~positives, float("-inf")), dim=1)
    return (torch.logsumexp(logits, dim=1) - on_positives).mean()


def alignment_loss(image_features, text_embeddings, loss_type="clip", tau=0.2, gather_with_grad=False,
                   local_loss=False, shared_targets=False):
    """Scalar alignment loss.

    Args:
        image_features: [B, D] projection-head outputs (any scale: normalised here).
        text_embeddings: [B, D] stored unit rows of the same images (any float dtype).
        loss_type: ``clip`` symmetric InfoNCE over the global batch; ``ctr`` image-to-text InfoNCE
            over the local batch; ``byol`` mean of 2 - 2 <z, t> over the local batch.
        tau: fixed temperature.
        gather_with_grad: (clip, several ranks) let gathered features carry gradient, so that after
            DDP's averaging the gradient equals that of one process holding the global batch. Off,
            it is 1/W of that (the released semantics).
        local_loss: (clip, with gather_with_grad) compute only this rank's rows and columns: the same
            gradient in O(B x W*B) memory instead of O((W*B)^2).
        shared_targets: (clip, ctr; class-level text targets) pairs whose text rows are identical are
            positives of each other (multi-positive cross-entropy), not negatives. Off (the paper),
            only the diagonal is positive, also for repeated-augmentation copies with identical rows.
    Logits and softmax are computed in float32, also under autocast.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if local_loss and not gather_with_grad:
        raise ValueError("local_loss needs gather_with_grad (without it the gradient would be wrong)")
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        z = F.normalize(image_features.float(), dim=-1)
        t = text_embeddings.float()
        if loss_type == "byol":
            return (2 - 2 * (z * t).sum(dim=-1)).mean()
        if loss_type == "ctr":
            positives = identical_rows(t, t) if shared_targets else None
            return contrastive_cross_entropy(z @ t.t() / tau, _arange(len(z), z.device), positives)
        rank = _world()[0]
        z_all, t_all = gather_features(z, gather_with_grad), gather_features(t)  # [W*B, D]; alone: z, t
        if local_loss:  # this rank's rows of both directions
            image_to_text, text_to_image = z @ t_all.t() / tau, t @ z_all.t() / tau
            labels = _arange(len(z), z.device, offset=rank * len(z))
            positives = identical_rows(t, t_all) if shared_targets else None
        else:
            image_to_text = z_all @ t_all.t() / tau
            text_to_image = image_to_text.t()
            labels = _arange(len(z_all), z.device)
            positives = identical_rows(t_all, t_all) if shared_targets else None
        return (contrastive_cross_entropy(image_to_text, labels, positives)
                + contrastive_cross_entropy(text_to_image, labels, positives)) / 2


@dataclass(frozen=True)
class Alignment:
    """The text-alignment settings of a run: ``loss(projected, text)`` is ``alignment_loss`` with them."""
    loss_type: str = "clip"
    tau: float = 0.2
    lamb: float = 0.3
    gather_with_grad: bool = False
    local_loss: bool = False
    shared_targets: bool = False

    def loss(self, image_features, text_embeddings):
        return alignment_loss(image_features, text_embeddings, self.loss_type, self.tau, self.gather_with_grad,
                              self.local_loss, self.shared_targets)

    def describe(self, world_size):
        return describe_alignment(self.loss_type, self.tau, self.lamb, self.gather_with_grad, self.local_loss,
                                  world_size)


def effective_text_weight(lamb, loss_type, gather_with_grad, world_size):
    """Weight of the global-batch text loss that reaches the weights after DDP's gradient averaging."""
    if loss_type == "clip" and not gather_with_grad and world_size > 1:
        return lamb / world_size
    return lamb


def describe_alignment(loss_type, tau, lamb, gather_with_grad, local_loss, world_size):
    """One log line stating the alignment setup and its effective weight."""
    if loss_type != "clip":
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
