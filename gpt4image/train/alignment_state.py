"""What the alignment loss keeps besides the model, saved and restored with it (``AlignmentState``)."""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .losses import SIGLIP_INIT


class AlignmentState(nn.Module):
    """What the alignment loss keeps besides the model, saved and restored with it: SigLIP's learned
    log temperature and bias (``sigmoid``), and the text rows' per-dimension mean and std
    (``--text-emb-standardize``, computed once from the training table)."""

    def __init__(self, loss_type: str, text_dim: int, standardize: bool = False) -> None:
        super().__init__()
        self.standardize = standardize
        if loss_type == "sigmoid":
            self.log_scale = nn.Parameter(torch.tensor(SIGLIP_INIT[0]))
            self.bias = nn.Parameter(torch.tensor(SIGLIP_INIT[1]))
        if standardize:
            self.register_buffer("text_mean", torch.zeros(text_dim))
            self.register_buffer("text_std", torch.ones(text_dim))

    def set_text_statistics(self, table: Tensor, chunk_rows: int = 65536) -> None:
        """Per-dimension mean and (unbiased) std of the [N, D] ``table``, in float64 by chunks."""
        self.set_statistics_of_blocks(table[start:start + chunk_rows] for start in range(0, table.shape[0], chunk_rows))

    def set_statistics_of_blocks(self, blocks: Iterable[Tensor]) -> None:
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

    def standardized(self, t: Tensor, unit: bool) -> Tensor:
        """(t - mean) / std per dimension; renormalised to unit rows when ``unit``."""
        t = (t.float() - self.text_mean) / self.text_std
        return F.normalize(t, dim=-1) if unit else t

    def loss_parameters(self, live: bool = True) -> dict[str, Tensor]:
        """{log_scale, bias} for ``alignment_loss`` (detached unless ``live``); empty without them."""
        if not hasattr(self, "log_scale"):
            return {}
        if live:
            return {"log_scale": self.log_scale, "bias": self.bias}
        return {"log_scale": self.log_scale.detach(), "bias": self.bias.detach()}


def needs_state(loss_type: str, standardize: bool) -> bool:
    """Whether a model trained with ``loss_type`` (and --text-emb-standardize) keeps an AlignmentState."""
    return loss_type == "sigmoid" or standardize
