"""Run under torchrun with 2 ranks: compare DDP gradients of the clip loss with one process's.

Writes a JSON report to argv[1] on rank 0: for each mode, the max relative difference between
the DDP gradient and (reference gradient x expected factor).
"""
import json
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import gpt4image
from gpt4image import alignment_loss


def reference_clip_loss(z, t, tau):
    z = F.normalize(z, dim=-1)
    logits = z @ t.t() / tau
    labels = torch.arange(len(z))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8)).double()


def main(out_path):
    info = gpt4image.init_distributed(device="cpu")
    world, rank = info.world_size, info.rank
    per_rank, tau = 5, 0.2
    g = torch.Generator().manual_seed(1)
    x_all = torch.randn(world * per_rank, 12, generator=g, dtype=torch.float64)
    t_all = F.normalize(torch.randn(world * per_rank, 8, generator=g, dtype=torch.float64), dim=-1)

    reference = make_model()
    reference_clip_loss(reference(x_all), t_all, tau).backward()
    ref_grads = [p.grad.clone() for p in reference.parameters()]

    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    report = {}
    for mode, kwargs, factor in [("default", {}, 1 / world),
                                 ("gather_with_grad", {"gather_with_grad": True}, 1.0),
                                 ("local_loss", {"gather_with_grad": True, "local_loss": True}, 1.0)]:
        model = nn.parallel.DistributedDataParallel(make_model())
        loss = alignment_loss(model(x_all[mine]), t_all[mine], "clip", tau, **kwargs)
        loss.backward()
        diffs = [((p.grad - factor * r).abs().max() / r.abs().max()).item()
                 for p, r in zip(model.parameters(), ref_grads)]
        report[mode] = max(diffs)
        if not kwargs.get("local_loss"):
            report[mode + "_loss"] = abs(loss.item() - reference_clip_loss(reference(x_all), t_all, tau).item())
    if rank == 0:
        json.dump(report, open(out_path, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
