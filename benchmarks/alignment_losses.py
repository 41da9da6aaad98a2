"""Step-time cost of each alignment loss and of exact accumulation, as a ratio to the training step
without alignment, at batch 256 with the real head widths (ResNet-50 2048 -> 1024, DeiT-B 768 -> 768).

    OMP_NUM_THREADS=1 python benchmarks/alignment_losses.py       # CPU: backbone timed at batch 4
    python benchmarks/alignment_losses.py --backbone-batch 256      # GPU: the whole step at batch 256

What is timed:
- the baseline: one optimizer step of the plain backbone (forward, backward, update) on random
  224 px images, at ``--backbone-batch``, scaled per image to 256 when smaller (a CPU cannot run a
  ResNet-50 step at batch 256 in a short benchmark; its cost is close to linear in the batch);
- each loss's own work at batch 256, in isolation: the projection head's forward, the loss, the
  backward through both and the update of the head (and of SigLIP's two scalars); ratio =
  (baseline + that) / baseline;
- exact accumulation (--accum-iter 2, per batch of 256; losses with negatives only): the extra
  no-grad forward of the backbone and head, and the loss over 2 x 256 features instead of 256;
  ratio over the same baseline.
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F

from common import RESULTS, print_table, write_json
from gpt4image import build_projection_head
from gpt4image.train.alignment_state import AlignmentState
from gpt4image.train.losses import LOSS_TYPES, LOSSES, alignment_loss

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODELS = {"resnet50": dict(width=2048, text=1024, bn=True, std=1024 ** -0.5, tau=0.2),
          "deit_base_patch16_224": dict(width=768, text=768, bn=False, std=0.02, tau=0.05)}


def best_seconds(fn, repeats, warmup=1):
    """Best of ``repeats`` calls: wall time on a GPU; on a CPU the process's CPU time, which other jobs on
    a shared machine do not inflate (with one thread, the wall time the call takes on an idle core)."""
    cuda = torch.cuda.is_available()
    clock = time.perf_counter if cuda else time.process_time
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(clock() - start)
    return min(times)


def backbone(name):
    import timm
    import torchvision
    return torchvision.models.resnet50() if name == "resnet50" else timm.create_model(name)


def baseline_and_forward(name, batch, repeats):
    """(training step, no-grad forward) seconds per image of the plain backbone at ``batch``."""
    model = backbone(name).to(DEVICE).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    images, targets = torch.randn(batch, 3, 224, 224, device=DEVICE), torch.randint(0, 1000, (batch,), device=DEVICE)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), targets).backward()
        opt.step()

    def forward():
        with torch.no_grad():
            model(images)

    return best_seconds(step, repeats) / batch, best_seconds(forward, repeats) / batch


def alignment_seconds(name, loss_type, batch, repeats, accumulated=1):
    """Head + loss + backward + head update at ``batch``; with ``accumulated`` > 1 the loss sees that many
    batches of features (the kept ones without gradient) and the head also runs once without gradient."""
    cfg = MODELS[name]
    head = build_projection_head("mlp", cfg["width"], cfg["text"], cfg["bn"], cfg["std"]).to(DEVICE).train()
    state = AlignmentState(loss_type, cfg["text"]).to(DEVICE)
    opt = torch.optim.SGD(list(head.parameters()) + list(state.parameters()), lr=0.01)
    features = torch.randn(batch, cfg["width"], device=DEVICE)
    text = F.normalize(torch.randn(batch * accumulated, cfg["text"], device=DEVICE), dim=-1).half()
    labels = torch.randint(0, 1000, (batch * accumulated,), device=DEVICE)
    kept = torch.randn(batch * (accumulated - 1), cfg["text"], device=DEVICE)

    def step():
        opt.zero_grad(set_to_none=True)
        if accumulated > 1:
            with torch.no_grad():
                head(features)
        z = torch.cat([head(features), kept])
        alignment_loss(z, text, loss_type, cfg["tau"], labels=labels, **state.loss_parameters()).backward()
        opt.step()

    return best_seconds(step, repeats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--losses", nargs="+", default=list(LOSS_TYPES), choices=list(LOSS_TYPES))
    p.add_argument("--batch", type=int, default=256, help="the alignment's batch (per process)")
    p.add_argument("--backbone-batch", type=int, default=4, help="batch at which the backbone step is timed")
    p.add_argument("--repeats", type=int, default=2, help="backbone timings (best of)")
    p.add_argument("--loss-repeats", type=int, default=5, help="alignment timings (best of)")
    p.add_argument("--json", default=os.path.join(RESULTS, "alignment_losses.json"))
    args = p.parse_args(argv)
    rows = []
    for name in args.models:
        step, forward = baseline_and_forward(name, args.backbone_batch, args.repeats)
        base = step * args.batch
        print(f"{name}: baseline step {base * 1e3:.0f} ms at batch {args.batch} "
              f"({step * 1e3:.1f} ms per image at batch {args.backbone_batch}); no-grad forward "
              f"{forward / step:.2f} of a step", flush=True)
        for loss_type in args.losses:
            own = alignment_seconds(name, loss_type, args.batch, args.loss_repeats)
            row = {"model": name, "loss": loss_type, "batch": args.batch, "baseline_ms": base * 1e3,
                   "alignment_ms": own * 1e3, "ratio": (base + own) / base}
            if LOSSES[loss_type].negatives:  # the others accumulate exactly without a second pass
                exact = alignment_seconds(name, loss_type, args.batch, args.loss_repeats, accumulated=2)
                row.update(exact_accum2_ms=(forward * args.batch + exact) * 1e3,
                           exact_accum2_ratio=(base + forward * args.batch + exact) / base)
            rows.append(row)
            print(f"  {loss_type}: alignment {own * 1e3:.1f} ms, ratio {row['ratio']:.4f}; exact accumulation x2 "
                  f"{row.get('exact_accum2_ratio', '-')}", flush=True)
    print_table(rows, ["model", "loss", "batch", "baseline_ms", "alignment_ms", "ratio", "exact_accum2_ms",
                       "exact_accum2_ratio"])
    write_json(args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
