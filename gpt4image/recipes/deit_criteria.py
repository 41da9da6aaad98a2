"""Classification criteria of the DeiT recipe, including knowledge distillation from a teacher."""

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from gpt4image.errors import UserError
from gpt4image.recipes.deit_data import TextMixup
from gpt4image.train.checkpoint import load_checkpoint, load_classifier_weights


class BinaryCrossEntropy(nn.Module):
    """DeiT's --bce-loss: BCE with logits against targets binarised at 0 (so Mixup keeps both labels)."""

    def forward(self, logits, targets):
        if targets.dim() == 1:
            targets = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, targets.gt(0.0).to(logits.dtype))


def base_criterion(mixup_active: bool, smoothing: float, bce_loss: bool) -> nn.Module:
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


def build_teacher(args, num_classes: int, device) -> nn.Module | None:
    if args.distillation_type == "none":
        return None
    if not args.teacher_path:
        raise UserError("distillation needs --teacher-path (a local checkpoint of --teacher-model)")
    teacher = timm.create_model(args.teacher_model, pretrained=False, num_classes=num_classes, global_pool="avg")
    load_classifier_weights(teacher, load_checkpoint(args.teacher_path), args.teacher_path, flag="--teacher-path")
    return teacher.to(device).eval()


def build_criterion(args, num_classes: int, device) -> tuple:
    """(criterion, mix_fn): DeiT's Mixup/CutMix (None when off), smoothing or BCE, distillation."""
    mixup_active = args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None
    mix_fn = None
    if mixup_active:
        mix_fn = TextMixup(mix_text=args.mix_text, mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                           cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob, switch_prob=args.mixup_switch_prob,
                           mode=args.mixup_mode, label_smoothing=args.smoothing, num_classes=num_classes)
    criterion = DistillationLoss(base_criterion(mixup_active, args.smoothing, args.bce_loss),
                                 build_teacher(args, num_classes, device), args.distillation_type,
                                 args.distillation_alpha, args.distillation_tau)
    return criterion, mix_fn
