"""The whole pipeline on built-in generated data: no download, no GPU, a few minutes on 2 cores.

    python -m gpt4image.demo [--out gpt4image_demo] [--nproc 2] [--epochs 5]

1. draws a small ImageFolder (4 visibly different classes, 32 px: 256 training and 200 validation
   images); builds a tiny random vision-language model (Qwen2-VL architecture) and a tiny random
   CLIP in OpenAI's checkpoint format;
2. runs generate_descriptions.py (images -> descriptions); a random model writes word salad that
   says nothing about the image, so by default (``--descriptions template``) the runs train with
   class-naming descriptions written in code, which do; ``--descriptions vlm`` trains with the
   word salad; then description2embedding.py (descriptions -> text-embedding table);
3. trains the ResNet recipe (resnet18) and the DeiT recipe (deit_tiny) with torchrun on --nproc
   processes, each with and without text alignment;
4. prints the results table (python -m gpt4image.report), draws the curves, and deletes what it
   need not show (checkpoints, the tiny VLM), saying how much it leaves and where.

Every run learns the task (>= 90 % top-1) and the alignment loss falls below its chance level. A tiny
random text encoder cannot show the method's benefit; the demo shows that every stage works.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import torch

from .cli import ArgumentParser, at_least
from .synthetic import describe_image_folder, make_image_folder, save_tiny_clip
from .describe.tiny_vlm import save_tiny_vlm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, cwd, env=None):
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True, env=env)


def describe(data: str, out: str, how: str) -> str:
    """Descriptions of the training images by a tiny random VLM through generate_descriptions.py,
    and (``how="template"``) class-naming ones written in code; returns the file to train with."""
    train = os.path.join(data, "train")
    generated = os.path.join(out, "descriptions.jsonl")
    vlm = save_tiny_vlm("qwen2_vl", os.path.join(out, "tiny_vlm"))
    print("\nThe descriptions below come from a tiny randomly initialised vision-language model: they are\n"
          "gibberish. The demo shows that every stage runs; a real model (README) writes real descriptions.",
          flush=True)
    shutil.rmtree(generated + ".parts", ignore_errors=True)
    _run([sys.executable, os.path.join(REPO, "generate_descriptions.py"), f"--data={train}", f"--model={vlm}",
          f"--output={generated}", "--max-new-tokens=24", "--batch-size=16", "--workers=1", "--force"], cwd=out)
    if how == "vlm":
        return generated
    captions = os.path.join(out, "descriptions.pth")
    texts, _ = describe_image_folder(train)
    torch.save(texts, captions)
    print(f"\nThe word salad says nothing about the images, so the runs train with class-naming descriptions\n"
          f"written in code ({captions}; e.g. {texts[0]!r}); --descriptions vlm trains with the word salad.",
          flush=True)
    return captions


def prepare_data(out: str, how: str = "vlm") -> dict[str, str]:
    """Images, descriptions, tiny models and the embedding table under ``out``; returns their paths."""
    data = os.path.join(out, "data")
    if not os.path.isfile(os.path.join(data, "val", "red_circle", "val_0049.jpg")):
        print(f"generating images under {data}", flush=True)
        make_image_folder(data, num_classes=4, train_per_class=64, val_per_class=50, size=32)
    captions = describe(data, out, how)
    clip_path = save_tiny_clip(os.path.join(out, "tiny_clip.pt"))
    emb = os.path.join(out, "text_emb.pth")
    _run([sys.executable, os.path.join(REPO, "description2embedding.py"), f"--caption={captions}",
          f"--model={clip_path}", f"--output={emb}", f"--data={os.path.join(data, 'train')}", "--force",
          "--workers=2"], cwd=out)
    return {"data": data, "descriptions": captions, "clip": clip_path, "embeddings": emb}


def _train(recipe, name, paths, out, args, text):
    run_dir = os.path.join(out, "runs", name)
    shutil.rmtree(run_dir, ignore_errors=True)
    text_emb = paths["embeddings"] if text else "none"
    if recipe == "resnet":
        flags = [f"--data={paths['data']}", f"--save_dir={run_dir}", "-a", "resnet18", "-b", "16", "-j", "1",
                 "--input-size", "32", "--lr", "0.02", "--no_scale_lr", "-p", "4"]
    else:
        flags = [f"--data-path={paths['data']}", f"--output_dir={run_dir}", "--model", "deit_tiny_patch16_224",
                 "--input-size", "32", "--batch-size", "16", "--num_workers", "1", "--lr", "2e-3", "--unscale-lr",
                 "--warmup-epochs", "1", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--aa", "none",
                 "--drop-path", "0", "--model-ema-decay", "0.9", "-p", "4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           os.path.join(REPO, recipe, "main.py"), *flags, f"--text_emb={text_emb}", f"--epochs={args.epochs}"]
    print(f"\n== {name}: {recipe} recipe, text alignment {'on' if text else 'off'} ==", flush=True)
    _run(cmd, cwd=os.path.join(REPO, recipe), env=dict(os.environ, OMP_NUM_THREADS="1"))
    return run_dir


def main(argv: list[str] | None = None) -> None:
    """Run the demo: data, descriptions, table, the four training runs, the report."""
    p = ArgumentParser("gpt4image.demo", description=__doc__)
    p.add_argument("--out", default="gpt4image_demo", help="folder for everything the demo makes")
    p.add_argument("--nproc", type=at_least(1), default=2, help="processes per training run (torchrun, gloo on CPU)")
    p.add_argument("--epochs", type=at_least(1), default=5)
    p.add_argument("--descriptions", choices=["vlm", "template"], default="template",
                   help="what the runs train with: the tiny random VLM's descriptions (word salad, no information "
                        "about the image) or class-naming sentences")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the runs' checkpoints and the tiny VLM")
    p.add_argument("--skip-training", action="store_true", help="stop after the embedding table")
    args = p.parse_args(argv)
    started = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    paths = prepare_data(out, args.descriptions)
    runs = []
    if not args.skip_training:
        for recipe in ("resnet", "deit"):
            for text in (False, True):
                runs.append(_train(recipe, f"{recipe}_{'gpt4image' if text else 'baseline'}", paths, out, args, text))
        from .report import main as report
        print("\n== results ==", flush=True)
        report([*runs, "--plot", os.path.join(out, "curves.png")])
        explain(runs, args.nproc)
    if not args.keep_checkpoints:
        clean_up(out, runs)
    print(f"\ndemo finished in {time.time() - started:.0f} s; it leaves {_megabytes(out):.0f} MB in {out}:")
    for name, path in paths.items():
        print(f"  {name:12s} {path}")
    for run in runs:
        print(f"  {'run':12s} {run}  (log.txt, args.json, classifier.pth, tensorboard/)")
    if runs:
        print(f"  {'curves':12s} {os.path.join(out, 'curves.png')}")


def explain(runs: list[str], nproc: int) -> None:
    """What the figures show, and what they cannot."""
    from .report import chance_text_loss
    from .train.run_record import read_log
    print("\nEvery run learns the generated task; with text alignment the alignment loss falls below its chance")
    for run in runs:
        rows = read_log(os.path.join(run, "log.txt"))
        args = json.load(open(os.path.join(run, "args.json")))
        chance = chance_text_loss(dict(args, world_size=args.get("world_size") or nproc))
        if chance is None or not rows:
            continue
        print(f"  {os.path.basename(run)}: text loss {rows[0]['train_text_loss']:.2f} -> "
              f"{rows[-1]['train_text_loss']:.2f} "
              f"(chance: ln({chance[1]}) = {chance[0]:.2f}, the loss of embeddings unrelated to the images)")
    print("A tiny random text encoder cannot show the method's benefit (the baselines learn this task as well);\n"
          "the demo shows that every stage works. The paper's gains need a real VLM, CLIP and ImageNet (README).\n"
          "Whether, which and when text helps (noisy labels, controls): python -m gpt4image.experiment\n"
          "(README, \"Does the text help?\").")


def clean_up(out: str, runs: list[str]) -> None:
    """Delete what the demo need not show: the runs' checkpoints (their classifier.pth, logs and
    TensorBoard files stay) and the tiny VLM."""
    for run in runs:
        for name in ("checkpoint.pth", "best_model.pth.tar", "best_checkpoint.pth"):
            path = os.path.join(run, name)
            if os.path.exists(path):
                os.unlink(path)
    shutil.rmtree(os.path.join(out, "tiny_vlm"), ignore_errors=True)


def _megabytes(folder):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files) / 2 ** 20


if __name__ == "__main__":
    main()
