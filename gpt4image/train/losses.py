"""Alignment losses between projected image features and stored CLIP text embeddings (arXiv 2306.00693).

Each loss of the registry (``LOSSES``) is a function of the projected image features and the text
rows; ``alignment_loss`` computes the registered one. The settings of a run are ``alignment.Alignment``,
the loss's learned scalars and statistics ``alignment_state.AlignmentState``.

With one process (or no process group) nothing here makes a distributed call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import TypedDict, Unpack


def _world() -> tuple[int, int]:
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


def gather_features(x: Tensor, gather_with_grad: bool = False) -> Tensor:
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


def identical_rows(rows: Tensor, columns: Tensor) -> Tensor:
    """[R, C] bool: row i of ``rows`` equals row j of ``columns`` exactly ([R, D] and [C, D], any float dtype)."""
    both = torch.cat([rows, columns])
    ids = torch.unique(both, dim=0, return_inverse=True)[1]
    return ids[:len(rows), None] == ids[None, len(rows):]


def contrastive_cross_entropy(logits: Tensor, labels: Tensor, positives: Tensor | None = None) -> Tensor:
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

def clip_loss(z: Tensor, t: Tensor, *, tau: float, gather_with_grad: bool = False, local_loss: bool = False,
              shared_targets: bool = False, **_: object) -> Tensor:
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


def ctr_loss(z: Tensor, t: Tensor, *, tau: float, shared_targets: bool = False, **_: object) -> Tensor:
    """Image-to-text InfoNCE over the local batch (van den Oord et al. 2018, CPC; GPT4Image's ``ctr``)."""
    z = F.normalize(z, dim=-1)
    positives = identical_rows(t, t) if shared_targets else None
    return contrastive_cross_entropy(z @ t.t() / tau, _arange(len(z), z.device), positives)


def byol_loss(z: Tensor, t: Tensor, **_: object) -> Tensor:
    """Mean of 2 - 2 <z, t> (BYOL's regression loss, Grill et al. 2020; GPT4Image's ``byol``)."""
    z = F.normalize(z, dim=-1)
    return (2 - 2 * (z * t).sum(dim=-1)).mean()


def cos_loss(z: Tensor, t: Tensor, **_: object) -> Tensor:
    """Mean of 1 - cos(z, t) (TextTeacher's ``cos``, arXiv 2605.22098)."""
    return (1 - F.cosine_similarity(z, t, dim=-1)).mean()


def l2_loss(z: Tensor, t: Tensor, **_: object) -> Tensor:
    """Mean squared error between the raw projection and the text row (TextTeacher's ``l2``)."""
    return F.mse_loss(z, t)


def kl_loss(z: Tensor, t: Tensor, **_: object) -> Tensor:
    """KL(softmax_0(t) || softmax_0(z)), each feature's distribution over the batch (dimension 0),
    divided by the batch size (TextTeacher's ``kl``; torch's kl_div with the text as the target)."""
    return F.kl_div(F.log_softmax(z, dim=0), F.softmax(t, dim=0), reduction="batchmean")


def dist_loss(z: Tensor, t: Tensor, **_: object) -> Tensor:
    """Frobenius norm of the difference of the two pairwise-distance matrices, each divided by its
    own norm (TextTeacher's ``dist``: the batch's geometry, not its coordinates)."""
    dz, dt = torch.cdist(z, z), torch.cdist(t, t)
    return torch.linalg.matrix_norm(dz / torch.linalg.matrix_norm(dz) - dt / torch.linalg.matrix_norm(dt))


VL2LITE_T = 2.0


def vl2lite_text_loss(z: Tensor, t: Tensor, **_: object) -> Tensor:
    """T^2 KL(softmax_0(t t^T / T) || softmax_0(z t^T / T)) on unit rows, T = 2: the image-text
    similarities distilled towards the text-text ones (VL2Lite, Jang et al. CVPR 2025, text part;
    as TextTeacher's ``vl2lite``)."""
    z, t = F.normalize(z, dim=-1), F.normalize(t, dim=-1)
    student, teacher = z @ t.t() / VL2LITE_T, t @ t.t() / VL2LITE_T
    return VL2LITE_T ** 2 * F.kl_div(F.log_softmax(student, dim=0), F.softmax(teacher, dim=0), reduction="batchmean")


SIGLIP_INIT = (math.log(10.0), -10.0)  # log temperature and bias at initialisation (SigLIP, Sec. 3.2)


def sigmoid_loss(z: Tensor, t: Tensor, *, log_scale: Tensor | None, bias: Tensor | None, shared_targets: bool = False,
                 **_: object) -> Tensor:
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


def supcon_loss(z: Tensor, t: Tensor, *, tau: float, labels: Tensor | None, **_: object) -> Tensor:
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


@dataclass(frozen=True, kw_only=True)
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
    "clip": LossSpec(fn=clip_loss, negatives=True, unit_text=True, gathers_itself=True),
    "ctr": LossSpec(fn=ctr_loss, negatives=False, unit_text=True),  # local batch by definition
    "byol": LossSpec(fn=byol_loss, negatives=False, unit_text=True),
    "cos": LossSpec(fn=cos_loss, negatives=False, unit_text=True),
    "l2": LossSpec(fn=l2_loss, negatives=False, unit_text=False),
    "kl": LossSpec(fn=kl_loss, negatives=True, unit_text=False),
    "dist": LossSpec(fn=dist_loss, negatives=True, unit_text=False),
    "sigmoid": LossSpec(fn=sigmoid_loss, negatives=True, unit_text=True),
    "supcon": LossSpec(fn=supcon_loss, negatives=True, unit_text=True, needs_labels=True),
    "vl2lite-text": LossSpec(fn=vl2lite_text_loss, negatives=True, unit_text=True),
}
LOSS_TYPES = tuple(LOSSES)


class LossOptions(TypedDict, total=False):
    """The keyword options of ``alignment_loss`` (each optional; the defaults in LOSS_OPTION_DEFAULTS)."""
    gather_with_grad: bool
    local_loss: bool
    labels: Tensor | None
    log_scale: Tensor | None
    bias: Tensor | None
    shared_targets: bool


LOSS_OPTION_DEFAULTS = {"gather_with_grad": False, "local_loss": False, "labels": None, "log_scale": None,
                        "bias": None, "shared_targets": False}


def alignment_loss(image_features: Tensor, text_embeddings: Tensor, loss_type: str = "clip", tau: float = 0.2,
                   **options: Unpack[LossOptions]) -> Tensor:
    """Scalar alignment loss of the registered ``loss_type`` (``LOSSES``).

    Args:
        image_features: [B, D] projection-head outputs (any scale).
        text_embeddings: [B, D] text rows of the same images (any float dtype).
        tau: fixed temperature (clip, ctr, supcon).
    Options (by keyword):
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
    unknown = sorted(set(options) - set(LOSS_OPTION_DEFAULTS))
    if unknown:
        raise TypeError(f"alignment_loss() got an unexpected keyword argument {unknown[0]!r}")
    o = {**LOSS_OPTION_DEFAULTS, **options}
    if loss_type not in LOSSES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    spec = LOSSES[loss_type]
    if o["local_loss"] and not o["gather_with_grad"]:
        raise ValueError("local_loss needs gather_with_grad (without it the gradient would be wrong)")
    if o["local_loss"] and loss_type != "clip":
        raise ValueError(f"local_loss is implemented for clip only, not {loss_type}")
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        z, t = image_features.float(), text_embeddings.float()
        if spec.negatives and not spec.gathers_itself:
            z, t = gather_features(z, o["gather_with_grad"]), gather_features(t)
            if o["labels"] is not None and spec.needs_labels:
                o["labels"] = gather_features(o["labels"])
        return spec.fn(z, t, tau=tau, **o)
