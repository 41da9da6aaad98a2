"""Input pipeline: images/s of each recipe's training transforms from ImageNet-sized JPEGs.

    python benchmarks/input_pipeline.py [--images 256] [--workers 0 1 2 4 8] [--target 4000 2000]

Writes --images JPEGs of about 500x375 px and 105 KiB (ImageNet's typical size), then reads them
through ImageFolder + the recipe's train transform (ResNet: RandomResizedCrop/flip; DeiT:
RandAugment, bicubic RRC, flip) with a DataLoader of N workers, batch 64. "ours" ships uint8
tensors (normalisation and DeiT's random erasing run on the GPU); "released" does ToTensor,
Normalize (and erasing) in the loader and opens images with torchvision's default loader, as the
original code does. Workers 0 runs in this process on
one thread: the images/s of one core. Reports how many such cores one GPU needs at --target images/s
and whether the loader feeds the training step measured on this machine by train_step.py.
"""
import argparse
import os
import tempfile
import time

import torch

from common import RESULTS, print_table, write_json


def make_jpegs(root, n):
    """``n`` 500x375 JPEGs of about 105 KiB each (ImageNet's typical size and file size): smooth
    colour fields plus multi-scale texture, which compress like photographs rather than like noise
    or flat colour (decoding cost follows the compressed size)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    folder = os.path.join(root, "train", "class0")
    os.makedirs(folder)
    for i in range(n):
        colour = rng.integers(0, 255, size=(12, 16, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(colour).resize((500, 375), Image.BICUBIC)).astype(np.float32)
        for scale in (1, 2, 4):
            noise = rng.integers(0, 255, size=(375 // scale + 1, 500 // scale + 1, 3), dtype=np.uint8)
            image += (np.asarray(Image.fromarray(noise).resize((500, 375), Image.BILINEAR)) - 127.5) / 3
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.jpg"), quality=90)
    return os.path.join(root, "train")


def transforms_for(recipe, released=False):
    """The recipe's training transform (ours ships uint8; ``released``: float, normalised, and for
    DeiT random-erased, in the loader as the original code does)."""
    from types import SimpleNamespace
    from torchvision import transforms
    if recipe == "resnet":
        from gpt4image.recipes import resnet as module
        ours = module.transforms_for(224)[0]
        if not released:
            return ours
        return transforms.Compose([*ours.transforms[:-1], transforms.ToTensor(),
                                   transforms.Normalize(module.MEAN, module.STD)])
    from gpt4image.recipes.deit_data import build_transform
    args = SimpleNamespace(input_size=224, color_jitter=0.3, aa="rand-m9-mstd0.5-inc1", train_interpolation="bicubic",
                           reprob=0.25, remode="pixel", recount=1, eval_crop_ratio=1.0)
    if not released:
        return build_transform(True, args)
    from timm.data import create_transform
    return create_transform(input_size=224, is_training=True, color_jitter=args.color_jitter, auto_augment=args.aa,
                            interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode,
                            re_count=args.recount)


def rate(folder, transform, workers, passes, released=False):
    """Images/s through a DataLoader: the released one (plain ImageFolder, torchvision's image loader)
    or the recipes' own (``build_train_loader``: per-sample seeding for exact resumes, our loader)."""
    import torchvision
    from gpt4image.train.data import build_train_loader, load_image
    if released:
        data = torchvision.datasets.ImageFolder(folder, transform)
        loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, num_workers=workers,
                                             persistent_workers=workers > 0)
    else:
        data = torchvision.datasets.ImageFolder(folder, transform, loader=load_image)
        loader, _ = build_train_loader(data, torch.utils.data.RandomSampler(data), 64, workers, False, seed=0)
    for _ in loader:  # warm-up pass (worker start, page cache)
        break
    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)  # one core, as in a loader worker
    start = time.perf_counter()
    n = 0
    for _ in range(passes):
        for batch in loader:
            n += len(batch[0])
    elapsed = time.perf_counter() - start
    torch.set_num_threads(threads)
    return n / elapsed


def measured_step_rates(path=None):
    """Fastest aligned images/s per recipe from train_step.py's JSON (the newest under results/ by
    default), or {} when there is none: what this machine's training step consumes."""
    import glob
    import json
    paths = [path] if path else sorted(glob.glob(os.path.join(RESULTS, "train_step*.json")), key=os.path.getmtime)
    if not paths or not os.path.isfile(paths[-1]):
        return {}, None
    rows = json.load(open(paths[-1]))["rows"]
    models = {"resnet": "resnet50", "deit": "deit_base_patch16_224"}
    rates = {recipe: max(r["aligned img/s"] for r in rows if r["model"] == model)
             for recipe, model in models.items() if any(r["model"] == model for r in rows)}
    return rates, paths[-1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=None)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="alternating measurements of each variant (best kept)")
    p.add_argument("--recipes", nargs="+", choices=["resnet", "deit"], default=["resnet", "deit"])
    p.add_argument("--target", type=float, nargs=2, default=[4000.0, 2000.0], metavar=("RESNET", "DEIT"),
                   help="images/s one GPU's training step consumes (issue targets on one H200, bf16)")
    p.add_argument("--step-json", default=None,
                   help="train_step.py results to compare with (default: the newest under benchmarks/results/)")
    p.add_argument("--json", default=os.path.join(RESULTS, "input_pipeline.json"))
    args = p.parse_args(argv)
    step_rates, step_json = measured_step_rates(args.step_json)
    cores = os.cpu_count() or 1
    workers = args.workers or sorted({0, 1, min(2, cores), min(4, cores), cores})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_jpegs(tmp, args.images)
        for recipe in args.recipes:
            variants = {"released": transforms_for(recipe, released=True), "ours": transforms_for(recipe)}
            for w in workers:
                best = {name: 0.0 for name in variants}
                for _ in range(args.repeats):  # alternate, keep the best: a shared machine's noise is one-sided
                    for name, transform in variants.items():
                        best[name] = max(best[name], rate(folder, transform, w, args.passes, name == "released"))
                rows.append({"recipe": recipe, "workers": w, "released img/s": best["released"],
                             "ours img/s": best["ours"], "x released": best["ours"] / best["released"]})
                print(rows[-1], flush=True)
    for recipe, target in zip(("resnet", "deit"), args.target):
        if recipe not in args.recipes:
            continue
        single = max(r["ours img/s"] for r in rows if r["recipe"] == recipe and r["workers"] <= 1)
        for r in rows:
            if r["recipe"] == recipe:
                r["target img/s"] = target
                r["cores for target"] = round(target / single, 1)
                r["feeds target"] = r["ours img/s"] >= target
                if recipe in step_rates:
                    r["step img/s here"] = step_rates[recipe]
                    r["feeds step here"] = r["ours img/s"] >= step_rates[recipe]
    print()
    print_table(rows, ["recipe", "workers", "released img/s", "ours img/s", "x released", "target img/s",
                       "cores for target", "feeds target", "step img/s here", "feeds step here"])
    if step_json:
        print(f"\n'step img/s here': the fastest aligned training step in {step_json}")
    else:
        print("\nno train_step.py results yet: run it first to see whether this machine's loader feeds its step")
    write_json(args.json, {"rows": rows, "jpeg_size": "500x375"})


if __name__ == "__main__":
    main()
