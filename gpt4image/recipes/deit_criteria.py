"""Classification criteria of the DeiT recipe, including knowledge distillation from a teacher."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy


class BinaryCrossEntropy(nn.Module):
    """DeiT's --bce-loss: BCE with logits against targets binarised at 0 (so Mixup keeps both labels)."""

    def forward(self, logits, targets):
        if targets.dim() == 1:
            targets = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, targets.gt(0.0).to(logits.dtype))


def base_criterion(mixup_active, smoothing, bce_loss):
    if bce_loss:
        return BinaryCrossEntropy()
    if mixup_active:
        return SoftTargetCrossEntropy()  # Mixup already folded label smoothing into the targets
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


class DistillationLoss(nn.Module):
    """(1 - alpha) * base loss on the class token + alpha * distillation loss on the distillation token.

    ``soft``: KL divergence between temperature-``tau`` softmaxes of student and teacher, times tau^2;
    ``hard``: cross-entropy against the teacher's arg-max. ``none``: the base loss only.
    Called as ``loss(images, outputs, targets)``; a distilled student returns (class, dist) logits.
    """

    def __init__(self, base, teacher, distillation_type, alpha, tau):
        super().__init__()
        if distillation_type not in ("none", "soft", "hard"):
            raise ValueError(f"distillation type must be none, soft or hard, got {distillation_type!r}")
        self.base, self.teacher = base, teacher
        self.distillation_type, self.alpha, self.tau = distillation_type, alpha, tau

    def forward(self, images, outputs, targets):
        dist_outputs = None
        if isinstance(outputs, (tuple, list)):
            outputs, dist_outputs = outputs
        loss = self.base(outputs, targets)
        if self.distillation_type == "none":
            return loss
        if dist_outputs is None:
            raise ValueError("distillation needs a distilled student (e.g. deit_base_distilled_patch16_224) "
                             "that returns class-token and distillation-token logits")
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        if self.distillation_type == "soft":
            t = self.tau
            kd = F.kl_div(F.log_softmax(dist_outputs / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                          reduction="sum", log_target=True) * (t * t) / dist_outputs.numel()
        else:
            kd = F.cross_entropy(dist_outputs, teacher_logits.argmax(dim=1))
        return loss * (1 - self.alpha) + kd * self.alpha
