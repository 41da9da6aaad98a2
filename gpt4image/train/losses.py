"""Alignment losses between projected image features and stored CLIP text embeddings (arXiv 2306.00693).

With one process (or no process group) nothing here makes a distributed call.
"""
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


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


# Each loss takes z [B, D] (the projection head's output, float32, any scale) and t [B, D] (the
# text rows of the same images, float32), both already gathered across ranks for a loss with
# negatives, plus what it needs by keyword; it returns a scalar.

def clip_loss(z, t, *, tau, gather_with_grad=False, local_loss=False, shared_targets=False, **_):
    """Symmetric InfoNCE over the global batch (CLIP, Radford et al. 2021; GPT4Image's default).
    Gathers its own features, so that ``local_loss`` can compute only this rank's rows.
    ``shared_targets``: pairs with identical text rows are positives (``contrastive_cross_entropy``)."""
    z = F.normalize(z, dim=-1)
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


def ctr_loss(z, t, *, tau, shared_targets=False, **_):
    """Image-to-text InfoNCE over the local batch (van den Oord et al. 2018, CPC; GPT4Image's ``ctr``)."""
    z = F.normalize(z, dim=-1)
    positives = identical_rows(t, t) if shared_targets else None
    return contrastive_cross_entropy(z @ t.t() / tau, _arange(len(z), z.device), positives)


def byol_loss(z, t, **_):
    """Mean of 2 - 2 <z, t> (BYOL's regression loss, Grill et al. 2020; GPT4Image's ``byol``)."""
    z = F.normalize(z, dim=-1)
    return (2 - 2 * (z * t).sum(dim=-1)).mean()


def cos_loss(z, t, **_):
    """Mean of 1 - cos(z, t) (TextTeacher's ``cos``, arXiv 2605.22098)."""
    return (1 - F.cosine_similarity(z, t, dim=-1)).mean()


def l2_loss(z, t, **_):
    """Mean squared error between the raw projection and the text row (TextTeacher's ``l2``)."""
    return F.mse_loss(z, t)


def kl_loss(z, t, **_):
    """KL(softmax_0(t) || softmax_0(z)), each feature's distribution over the batch (dimension 0),
    divided by the batch size (TextTeacher's ``kl``; torch's kl_div with the text as the target)."""
    return F.kl_div(F.log_softmax(z, dim=0), F.softmax(t, dim=0), reduction="batchmean")


def dist_loss(z, t, **_):
    """Frobenius norm of the difference of the two pairwise-distance matrices, each divided by its
    own norm (TextTeacher's ``dist``: the batch's geometry, not its coordinates)."""
    dz, dt = torch.cdist(z, z), torch.cdist(t, t)
    return torch.linalg.matrix_norm(dz / torch.linalg.matrix_norm(dz) - dt / torch.linalg.matrix_norm(dt))


VL2LITE_T = 2.0


def vl2lite_text_loss(z, t, **_):
    """T^2 KL(softmax_0(t t^T / T) || softmax_0(z t^T / T)) on unit rows, T = 2: the image-text
    similarities distilled towards the text-text ones (VL2Lite, Jang et al. CVPR 2025, text part;
    as TextTeacher's ``vl2lite``)."""
    z, t = F.normalize(z, dim=-1), F.normalize(t, dim=-1)
    student, teacher = z @ t.t() / VL2LITE_T, t @ t.t() / VL2LITE_T
    return VL2LITE_T ** 2 * F.kl_div(F.log_softmax(student, dim=0), F.softmax(teacher, dim=0), reduction="batchmean")


SIGLIP_INIT = (math.log(10.0), -10.0)  # log temperature and bias at initialisation (SigLIP, Sec. 3.2)


def sigmoid_loss(z, t, *, log_scale, bias, shared_targets=False, **_):
    """-1/B sum over all B x B pairs of log sigmoid(y_ij (exp(log_scale) <z_i, t_j> + bias)), y_ij
    +1 for an image and its own text, -1 otherwise (SigLIP, Zhai et al. ICCV 2023, Algorithm 1);
    ``log_scale`` and ``bias`` are learned (``AlignmentState``); None: their initial values.
    ``shared_targets``: y_ij is +1 also where t_j is identical to t_i (class-level targets: the
    same pair would otherwise be asked to be both a positive and a negative)."""
    z, t = F.normalize(z, dim=-1), F.normalize(t, dim=-1)
    if log_scale is None:
        log_scale, bias = (torch.tensor(v, device=z.device) for v in SIGLIP_INIT)
    logits = log_scale.exp() * (z @ t.t()) + bias
    positive = identical_rows(t, t) if shared_targets else torch.eye(len(z), device=z.device, dtype=torch.bool)
    signs = 2 * positive.to(z.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / len(z)


def supcon_loss(z, t, *, tau, labels, **_):
    """Supervised contrastive loss (SupCon, Khosla et al. NeurIPS 2020, L_out) over 2B views: the B
    images and their B text rows. For each view a, the mean over its positives p (the other views
    of the same class, or whose text rows are identical; an image's own text always) of
    -log softmax over all views but a of <v_a, v_p> / tau; averaged over the 2B views."""
    if labels is None:
        raise ValueError("the supcon loss needs the class labels of the batch")
    views = torch.cat([F.normalize(z, dim=-1), F.normalize(t, dim=-1)])
    text_id = torch.unique(t, dim=0, return_inverse=True)[1]
    labels, text_id = labels.repeat(2), text_id.repeat(2)
    others = ~torch.eye(len(views), dtype=torch.bool, device=z.device)
    positive = ((labels[:, None] == labels[None, :]) | (text_id[:, None] == text_id[None, :])) & others
    logits = (views @ views.t() / tau).masked_fill(~others, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    per_view = -log_prob.masked_fill(~positive, 0).sum(dim=1) / positive.sum(dim=1)
    return per_view.mean()


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: ``negatives`` (its value couples the samples of the batch: gathered
    across ranks, and exact under --accum-iter); ``unit_text`` (it compares directions: standardised
    text rows are renormalised to unit length for it); ``gathers_itself`` (clip: its own gather)."""
    fn: Callable
    negatives: bool
    unit_text: bool
    needs_labels: bool = False
    gathers_itself: bool = False


LOSSES = {
    "clip": LossSpec(clip_loss, negatives=True, unit_text=True, gathers_itself=True),
    "ctr": LossSpec(ctr_loss, negatives=False, unit_text=True),  # local batch by definition
    "byol": LossSpec(byol_loss, negatives=False, unit_text=True),
    "cos": LossSpec(cos_loss, negatives=False, unit_text=True),
    "l2": LossSpec(l2_loss, negatives=False, unit_text=False),
    "kl": LossSpec(kl_loss, negatives=True, unit_text=False),
    "dist": LossSpec(dist_loss, negatives=True, unit_text=False),
    "sigmoid": LossSpec(sigmoid_loss, negatives=True, unit_text=True),
    "supcon": LossSpec(supcon_loss, negatives=True, unit_text=True, needs_labels=True),
    "vl2lite-text": LossSpec(vl2lite_text_loss, negatives=True, unit_text=True),
}
LOSS_TYPES = tuple(LOSSES)


def alignment_loss(image_features, text_embeddings, loss_type="clip", tau=0.2, gather_with_grad=False,
                   local_loss=False, labels=None, log_scale=None, bias=None, shared_targets=False):
    """Scalar alignment loss of the registered ``loss_type`` (``LOSSES``).

    Args:
        image_features: [B, D] projection-head outputs (any scale).
        text_embeddings: [B, D] text rows of the same images (any float dtype).
        tau: fixed temperature (clip, ctr, supcon).
        gather_with_grad: (losses with negatives, several ranks) let gathered features carry
            gradient, so that after DDP's averaging the gradient equals that of one process holding
            the global batch. Off, it is 1/W of that (the released semantics of clip).
        local_loss: (clip, with gather_with_grad) compute only this rank's rows and columns: the same
            gradient in O(B x W*B) memory instead of O((W*B)^2).
        labels: [B] class labels (supcon), gathered with the features.
        log_scale, bias: SigLIP's learned scalars (sigmoid).
        shared_targets: (clip, ctr, sigmoid; class-level text targets) pairs whose text rows are identical are
            positives of each other (multi-positive cross-entropy), not negatives. Off (the paper),
            only the diagonal is positive, also for repeated-augmentation copies with identical rows.
    Computed in float32, also under autocast.
    """
    if loss_type not in LOSSES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    spec = LOSSES[loss_type]
    if local_loss and not gather_with_grad:
        raise ValueError("local_loss needs gather_with_grad (without it the gradient would be wrong)")
    if local_loss and loss_type != "clip":
        raise ValueError(f"local_loss is implemented for clip only, not {loss_type}")
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        z, t = image_features.float(), text_embeddings.float()
        if spec.negatives and not spec.gathers_itself:
            z, t = gather_features(z, gather_with_grad), gather_features(t)
            labels = gather_features(labels) if labels is not None and spec.needs_labels else labels
        return spec.fn(z, t, tau=tau, gather_with_grad=gather_with_grad, local_loss=local_loss, labels=labels,
                       log_scale=log_scale, bias=bias, shared_targets=shared_targets)


class AlignmentState(nn.Module):
    """What the alignment loss keeps besides the model, saved and restored with it: SigLIP's learned
    log temperature and bias (``sigmoid``), and the text rows' per-dimension mean and std
    (``--text-emb-standardize``, computed once from the training table)."""

    def __init__(self, loss_type, text_dim, standardize=False):
        super().__init__()
        self.standardize = standardize
        if loss_type == "sigmoid":
            self.log_scale = nn.Parameter(torch.tensor(SIGLIP_INIT[0]))
            self.bias = nn.Parameter(torch.tensor(SIGLIP_INIT[1]))
        if standardize:
            self.register_buffer("text_mean", torch.zeros(text_dim))
            self.register_buffer("text_std", torch.ones(text_dim))

    def set_text_statistics(self, table, chunk_rows=65536):
        """Per-dimension mean and (unbiased) std of the [N, D] ``table``, in float64 by chunks."""
        self.set_statistics_of_blocks(table[start:start + chunk_rows] for start in range(0, table.shape[0], chunk_rows))

    def set_statistics_of_blocks(self, blocks):
        """Per-dimension mean and (unbiased) std of the rows of ``blocks`` ([n_i, D] tensors), in float64."""
        total = torch.zeros(self.text_mean.shape[0], dtype=torch.float64)
        squares = torch.zeros_like(total)
        n = 0
        for rows in blocks:
            rows = rows.to(torch.float64)
            total += rows.sum(dim=0)
            squares += (rows * rows).sum(dim=0)
            n += rows.shape[0]
        mean = total / max(n, 1)
        var = (squares - n * mean * mean).clamp(min=0) / max(n - 1, 1)
        self.text_mean.copy_(mean)
        self.text_std.copy_(var.sqrt().clamp(min=1e-6))

    def standardized(self, t, unit):
        """(t - mean) / std per dimension; renormalised to unit rows when ``unit``."""
        t = (t.float() - self.text_mean) / self.text_std
        return F.normalize(t, dim=-1) if unit else t

    def loss_parameters(self, live=True):
        """{log_scale, bias} for ``alignment_loss`` (detached unless ``live``); empty without them."""
        if not hasattr(self, "log_scale"):
            return {}
        if live:
            return {"log_scale": self.log_scale, "bias": self.bias}
        return {"log_scale": self.log_scale.detach(), "bias": self.bias.detach()}


def needs_state(loss_type, standardize):
    return loss_type == "sigmoid" or standardize


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
    def negatives(self):
        return LOSSES[self.loss_type].negatives

    def loss(self, image_features, text_embeddings, labels=None, state=None, live_parameters=True):
        """``state``: the model's ``AlignmentState`` (standardisation, SigLIP's parameters), or None."""
        extra = {}
        if state is not None:
            if state.standardize:
                text_embeddings = state.standardized(text_embeddings, LOSSES[self.loss_type].unit_text)
            extra = state.loss_parameters(live_parameters)
        return alignment_loss(image_features, text_embeddings, self.loss_type, self.tau, self.gather_with_grad,
                              self.local_loss, labels=labels, shared_targets=self.shared_targets, **extra)

    def weight(self, epoch, step=0, steps=1):
        """The weight of the text loss at ``step`` of ``steps`` in ``epoch``."""
        return self.lamb if self.schedule is None else self.schedule.weight(self.lamb, epoch, step, steps)

    def describe(self, world_size):
        line = describe_alignment(self.loss_type, self.tau, self.lamb, self.gather_with_grad, self.local_loss,
                                  world_size)
        scheduled = self.schedule is not None and self.schedule.kind != "const"
        return line + (f"; weight schedule {self.schedule.describe()}" if scheduled else "")


def effective_text_weight(lamb, loss_type, gather_with_grad, world_size):
    """Weight of the global-batch text loss that reaches the weights after DDP's gradient averaging."""
    if LOSSES[loss_type].negatives and not gather_with_grad and world_size > 1:
        return lamb / world_size
    return lamb


def describe_alignment(loss_type, tau, lamb, gather_with_grad, local_loss, world_size):
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
