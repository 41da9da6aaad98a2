"""Checkpoint bytes written per epoch by the training loop, before and after issue 25.

    python benchmarks/checkpoint_bytes.py              # tiny CPU runs of both recipes (a minute or two)
    python benchmarks/checkpoint_bytes.py --epochs 4   # more epochs: more new bests to count

Counts every byte the loop writes through its save functions (atomic_torch_save, the small
evaluated.json, the best checkpoint's link or copy) over a tiny run of each recipe (generated images,
32 px, ResNet-18 / DeiT-tiny with 1024-d text alignment; DeiT with its EMA and AdamW), per epoch and
as a multiple of one full training state. The full-size figures scale that multiple by the state of
the real architectures (ResNet-50 with SGD momentum; DeiT-B with EMA and AdamW; each with its
1024-d projection head), counted on the meta device: float32 model (parameters and buffers), EMA
copy, and optimizer moments (SGD: 1 per parameter, AdamW: 2).

"Before" is the old loop's write count applied to the same run: 2 full writes per epoch (before and
after the evaluation) + 1 for every epoch with a new best top-1 (the best checkpoint was a third full
write); the number of new bests is the one this run had (its log.txt), and the worst case (every
epoch a new best, as early in training) is shown too.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

from common import RESULTS, print_table, write_json
import torch

from gpt4image import TextAlignedModel, build_projection_head

TEXT_DIM = 1024
FULL = {"resnet": ("ResNet-50, SGD", "resnet50", 1, False),  # (label, architecture, optimizer moments, EMA)
        "deit": ("DeiT-B, AdamW, EMA", "deit_base_patch16_224", 2, True)}


def full_state_bytes(recipe):
    """float32 bytes of the real architecture's training state (model, EMA, optimizer moments)."""
    _, arch, moments, ema = FULL[recipe]
    with torch.device("meta"):
        if recipe == "resnet":
            import torchvision
            backbone = torchvision.models.get_model(arch, num_classes=1000)
            head = build_projection_head("mlp", backbone.fc.in_features, TEXT_DIM, batchnorm=True, init_std=0.03)
        else:
            import timm
            backbone = timm.create_model(arch, num_classes=1000)
            head = build_projection_head("mlp", backbone.num_features, TEXT_DIM, batchnorm=False, init_std=0.02)
        model = TextAlignedModel(backbone, head)
    params = sum(p.numel() for p in model.parameters())
    model_numel = params + sum(b.numel() for b in model.buffers())
    return 4 * (model_numel * (2 if ema else 1) + params * moments)


class Counter:
    """Wraps the loop's writers and adds up what they write."""

    def __init__(self):
        self.full_writes, self.full_bytes, self.small_bytes, self.links, self.copied_bytes = 0, 0, 0, 0, 0

    def install(self, monkey):
        import gpt4image.train.checkpoint as checkpoint
        import gpt4image.train.checkpoints as checkpoints
        save, write_json_, link = checkpoint.atomic_torch_save, checkpoints.atomic_write_json, checkpoints.os.link

        def counted_save(obj, path):
            save(obj, path)
            self.full_writes += 1
            self.full_bytes += os.path.getsize(path)

        def counted_json(path, obj):
            write_json_(path, obj)
            self.small_bytes += os.path.getsize(path)

        def counted_link(source, target):
            link(source, target)
            self.links += 1
        monkey.append((checkpoint, "atomic_torch_save", save))
        monkey.append((checkpoints, "atomic_write_json", write_json_))
        checkpoint.atomic_torch_save, checkpoints.atomic_write_json = counted_save, counted_json
        checkpoints.os.link = counted_link
        monkey.append((checkpoints.os, "link", link))


def tiny_run(recipe, epochs, out):
    """(Counter, epochs with a new best top-1) of a tiny run of ``recipe``."""
    from gpt4image.recipes import deit, resnet
    common = [f"--epochs={epochs}", "--input-size=32", "--generated-size", "64", "16", "--seed=0", "-p", "100",
              f"--text_emb={out}/none.pth", "--checkpoint-every-minutes=0"]
    if recipe == "resnet":
        main, argv = resnet.main, ["-a", "resnet18", "-b", "16", "-j", "0", "--num-classes=4", f"--save_dir={out}"]
    else:
        main, argv = deit.main, ["--model", "deit_tiny_patch16_224", "--batch-size=16", "--num_workers=0",
                                 "--nb-classes=4", "--warmup-epochs=1", f"--output_dir={out}"]
    counter, monkey = Counter(), []
    counter.install(monkey)
    try:
        main(argv + common)
    finally:
        for module, name, original in monkey:
            setattr(module, name, original)
    best, bests = -1.0, 0
    for line in open(os.path.join(out, "log.txt")):
        acc = json.loads(line)["test_acc1"]
        bests, best = bests + (acc > best), max(best, acc)
    return counter, bests


def measure(recipe, epochs, tmp):
    counter, bests = tiny_run(recipe, epochs, os.path.join(tmp, recipe))
    state = os.path.getsize(os.path.join(tmp, recipe, "checkpoint.pth"))
    full = full_state_bytes(recipe)
    small = counter.small_bytes / epochs
    after = counter.full_writes / epochs + small / full  # full states written per epoch, at full size
    before = (2 * epochs + bests) / epochs
    worst = 3.0
    return {"recipe": recipe, "model": FULL[recipe][0], "epochs": epochs, "new bests": bests,
            "tiny state MB": state / 1e6, "full writes": counter.full_writes, "best links": counter.links,
            "tiny MB/epoch": (counter.full_bytes + counter.small_bytes) / epochs / 1e6, "small bytes/epoch": small,
            "full state GB": full / 1e9,
            "before states/epoch": before, "after states/epoch": after,
            "before GB/epoch": before * full / 1e9, "worst before GB/epoch": worst * full / 1e9,
            "after GB/epoch": after * full / 1e9}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--recipes", nargs="+", default=["resnet", "deit"], choices=["resnet", "deit"])
    p.add_argument("--json", default=os.path.join(RESULTS, "checkpoint_bytes.json"))
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tmp = tempfile.mkdtemp(prefix="checkpoint_bytes_")
    try:
        rows = [measure(recipe, args.epochs, tmp) for recipe in args.recipes]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(rows, ["model", "epochs", "new bests", "full writes", "best links", "tiny state MB", "tiny MB/epoch",
                       "small bytes/epoch",
                       "full state GB", "before states/epoch", "after states/epoch", "before GB/epoch",
                       "worst before GB/epoch", "after GB/epoch"])
    write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    sys.exit(main())
