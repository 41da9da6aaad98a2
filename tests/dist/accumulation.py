"""Exact accumulation across ranks: DeiT-tiny (32 px, drop-path 0, no EMA) with an alignment loss,
trained for 2 optimizer steps of 8 images each on fixed tensors, through the training epoch loop.

    python accumulation.py OUT BATCH ACCUM            (one process)
    torchrun --nproc_per_node=W accumulation.py OUT BATCH ACCUM

W x BATCH x ACCUM must be 8. Rank 0 writes {"clip", "supcon", "clip/per-batch": the model's final
state dict} to OUT (the last with --accum-alignment per-batch). SGD, so that the
comparison measures the summed gradients (Adam's first step turns tiny gradients into +-lr)."""
import os
import sys

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gpt4image  # noqa: E402
from gpt4image.recipes.deit import build_model, get_args_parser  # noqa: E402
from gpt4image.train.epoch import train_one_epoch  # noqa: E402
from gpt4image.train.step import TrainStep  # noqa: E402
from gpt4image.train.alignment import Alignment  # noqa: E402
from gpt4image.train.resumable import seed_all  # noqa: E402

STEPS, PER_STEP = 2, 8


def main(out, batch, accum):
    info = gpt4image.init_distributed(device="cpu")
    world, rank = info.world_size, info.rank
    assert world * batch * accum == PER_STEP
    results = {}
    for name in ("clip", "supcon", "clip/per-batch"):
        results[name] = train(name.split("/")[0], "per-batch" not in name, world, rank, batch, accum)
    if rank == 0:
        torch.save(results, out)
    if world > 1:
        torch.distributed.destroy_process_group()


def train(loss_type, exact, world, rank, batch, accum):
    args = get_args_parser().parse_args(["--model", "deit_tiny_patch16_224", "--input-size", "32",
                                                   "--drop-path=0", "--no-model-ema"])
    seed_all(0)
    model = build_model(args, 4, 8)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    g = torch.Generator().manual_seed(1)
    images = torch.randn(STEPS * PER_STEP, 3, 32, 32, generator=g)
    labels = torch.randint(0, 4, (STEPS * PER_STEP,), generator=g)
    text = F.normalize(torch.randn(STEPS * PER_STEP, 8, generator=g), dim=-1)
    text[labels == 3] = text[labels == 3][0]  # one class shares its description (supcon: identical rows)
    loader = []
    for s in range(STEPS):
        for k in range(accum):  # this rank's k-th batch of step s
            start = s * PER_STEP + (k * world + rank) * batch
            part = slice(start, start + batch)
            loader.append((images[part], labels[part], text[part]))
    alignment = Alignment(loss_type, 0.05, 0.3, gather_with_grad=True, exact_accumulation=exact)
    step = TrainStep(model=train_model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                     criterion=lambda _, logits, targets: F.cross_entropy(logits, targets), device=torch.device("cpu"),
                     alignment=alignment, accum_iter=accum)
    train_one_epoch(step, loader, 0)
    return model.state_dict()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
