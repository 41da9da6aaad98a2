"""Projection heads and the wrapper that returns logits and the projected feature in one pass."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


def build_projection_head(kind: str, in_dim: int, out_dim: int, batchnorm: bool, init_std: float) -> nn.Sequential:
    """Head from the pre-logits feature [B, in_dim] to the text-embedding space [B, out_dim].

    ``mlp``: Linear(in, 2*out) -> [BatchNorm1d] -> ReLU -> Linear(2*out, out); the first Linear has
    a bias only without BatchNorm (ResNet recipe: BN, std 1024**-0.5; DeiT recipe: no BN, std 0.02).
    ``linear``: Linear(in, out, no bias). Weights truncated-normal with ``init_std``; biases keep
    PyTorch's default uniform initialisation, as in the released code.
    """
    if kind == "mlp":
        hidden = 2 * out_dim
        layers = [nn.Linear(in_dim, hidden, bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)]
        head = nn.Sequential(*layers)
    elif kind == "linear":
        head = nn.Sequential(nn.Linear(in_dim, out_dim, bias=False))
    else:
        raise ValueError(f"projection head kind must be 'mlp' or 'linear', got {kind!r}")
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=init_std)
    return head


def _is_torchvision_resnet(model):
    import torchvision
    return isinstance(model, torchvision.models.ResNet)


class TextAlignedModel(nn.Module):
    """A classifier plus a projection head on its pre-logits feature.

    In training (with a head) ``forward`` returns ``(logits, projected_feature)`` from one pass of
    the backbone; in evaluation, or without a head, it returns the logits only. ``backbone`` keeps
    its own state-dict keys, so ``backbone.state_dict()`` loads into the plain torchvision / timm model.
    Works for torchvision ResNets and timm models with ``forward_head(..., pre_logits=True)``.
    """

    def __init__(self, backbone: nn.Module, projection_head: nn.Module | None = None,
                 alignment_state: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = projection_head
        self.alignment_state = alignment_state  # the loss's own state (alignment_state.AlignmentState), or None
        self._torchvision_resnet = _is_torchvision_resnet(backbone)
        # Distilled timm models average two tokens in forward_head; plain ones apply one classifier.
        self._timm_single_head = (not self._torchvision_resnet
                                  and isinstance(backbone.get_classifier(), nn.Module))

    def pre_logits(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Returns ``(pre_logits_feature, backbone_features)``."""
        m = self.backbone
        if self._torchvision_resnet:
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
            return torch.flatten(m.avgpool(x), 1), None
        features = m.forward_features(x)
        return m.forward_head(features, pre_logits=True), features

    def logits_and_projection(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, projected feature) in any mode: evaluation's retrieval figures."""
        feature, features = self.pre_logits(x)
        return self._logits(feature, features), self.projection_head(feature)

    def _logits(self, feature, features):
        if self._torchvision_resnet:
            return self.backbone.fc(feature)
        if self._timm_single_head:
            return self.backbone.get_classifier()(feature)
        return self.backbone.forward_head(features)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Logits; in training with a head (logits, projected feature)."""
        feature, features = self.pre_logits(x)
        logits = self._logits(feature, features)
        if not self.training or self.projection_head is None:
            return logits
        return logits, self.projection_head(feature)
