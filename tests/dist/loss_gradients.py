"""Run under torchrun with 2 ranks: for every alignment loss with negatives, the DDP gradient with
--gather-with-grad equals the gradient of one process holding the global batch (computed with the
loop references of tests/alignment_references.py); without it (the released gather) the model's
gradient is 1/W of it, and SigLIP's learned scalars get the whole of it (every rank computes the
global loss). Writes {loss/mode: max relative difference} to argv[1] on rank 0."""
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import alignment_references as ref  # noqa: E402

import gpt4image  # noqa: E402
from gpt4image.train.losses import alignment_loss  # noqa: E402


class Model(nn.Module):
    def __init__(self, scalars):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 5))
        if scalars:  # SigLIP's, used by the loss outside forward (as the recipes do)
            self.log_scale = nn.Parameter(torch.tensor(0.8))
            self.bias = nn.Parameter(torch.tensor(-1.5))

    def forward(self, x):
        return self.net(x)


def main(out_path):
    info = gpt4image.init_distributed(device="cpu")
    world, rank = info.world_size, info.rank
    per_rank, tau = 4, 0.3
    g = torch.Generator().manual_seed(1)
    x_all = torch.randn(world * per_rank, 7, generator=g)
    t_all = F.normalize(torch.randn(world * per_rank, 5, generator=g), dim=-1)
    t_all[5] = t_all[0]  # the same text on both ranks: a supcon positive across ranks
    labels_all = torch.tensor([0, 1, 2, 0, 1, 3, 2, 3])[:world * per_rank]
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    report = {}
    for loss_type in ref.WITH_NEGATIVES:
        reference = Model(loss_type == "sigmoid").double()
        scalars = {"log_scale": reference.log_scale, "bias": reference.bias} if loss_type == "sigmoid" else {}
        ref.REFERENCES[loss_type](reference(x_all.double()), t_all.double(), tau=tau, labels=labels_all,
                                  **scalars).backward()
        for mode in ("gather_with_grad", "default"):
            model = nn.parallel.DistributedDataParallel(Model(loss_type == "sigmoid"))
            extra = {"log_scale": model.module.log_scale, "bias": model.module.bias} if loss_type == "sigmoid" else {}
            loss = alignment_loss(model(x_all[mine]), t_all[mine], loss_type, tau,
                                  gather_with_grad=mode == "gather_with_grad", labels=labels_all[mine], **extra)
            loss.backward()
            got, expected = [], []
            for (name, p), r in zip(model.module.named_parameters(), reference.parameters()):
                factor = 1 / world if mode == "default" and name.startswith("net") else 1.0
                got.append(p.grad.double().flatten())
                expected.append(factor * r.grad.flatten())
            got, expected = torch.cat(got), torch.cat(expected)  # relative to the largest (some are ~0: kl's bias)
            worst = ((got - expected).abs().max() / expected.abs().max()).item()
            report[f"{loss_type}/{mode}"] = worst
    if rank == 0:
        json.dump(report, open(out_path, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
