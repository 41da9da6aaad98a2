"""Does the text help, and when? Both recipes on generated data with noisy labels, against controls.

    python -m gpt4image.experiment [--out gpt4image_experiment] [--jobs 2] [--quick]

1. draws an ImageFolder whose class is decided by two attributes (colour x shape) and whose images
   also differ in what does not decide it (size, position, background); every training image gets
   a description that states what it shows (its colour and shape, and the irrelevant detail);
2. encodes the descriptions with a fixed bag-of-words encoder written here (a random vector per word,
   averaged and L2-normalised) into the per-image table, and "a photo of a {colour} {shape}" templates
   into the per-class table; a tiny random CLIP does not separate the attribute words (README);
3. trains, for each recipe, label noise and seed: the baseline (--text_emb none) and the text targets
   image, class-text (the label only), shuffled (rows permuted within each class) and random;
4. prints the mean +- std of the clean top-1 (final epoch, clean validation labels) over the seeds,
   writes results.json, table.md and plot.png, and says where they are.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from ..cli import ArgumentParser, at_least, in_range
from ..errors import UserError
from ..io import atomic_write_json
from .data import class_names, make_data, write_tables
from .runs import CONDITIONS, train_all
from .table import report


def get_args_parser() -> ArgumentParser:
    """The experiment's flags."""
    p = ArgumentParser("gpt4image.experiment", description=__doc__)
    p.add_argument("--out", default="gpt4image_experiment", help="folder for the data, the tables and the runs")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: 1 seed, noise 0.6, 1 epoch, 3 training images per class (seconds, not minutes)")
    p.add_argument("--recipes", nargs="+", choices=["resnet", "deit"], default=["resnet", "deit"])
    p.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    p.add_argument("--noise", nargs="+", type=in_range(minimum=0, below=1), default=[0.0, 0.4, 0.6])
    p.add_argument("--seeds", type=at_least(1), default=3, help="seeds 0 .. N-1 of every condition")
    p.add_argument("--epochs", type=at_least(1), default=8)
    p.add_argument("--train-per-class", type=at_least(2), default=24)
    p.add_argument("--val-per-class", type=at_least(1), default=20)
    p.add_argument("--size", type=at_least(8), default=32, help="size of the generated images (DeiT trains at it)")
    p.add_argument("--resnet-size", type=at_least(8), default=16, help="the ResNet's --input-size")
    p.add_argument("--lamb", type=in_range(minimum=0), default=None, help="text-loss weight (default: the recipe's)")
    p.add_argument("--jobs", type=at_least(1), default=2, help="runs trained at once (one core each)")
    p.add_argument("--table-only", action="store_true",
                   help="print the table of the runs in --out/results.json (also of an unfinished experiment) and "
                        "draw the plot; train nothing")
    return p


RESULT_SETTINGS = ("recipes", "conditions", "noise", "seeds", "epochs", "train_per_class", "val_per_class", "size",
                   "resnet_size", "lamb")


def run_key(run: dict) -> tuple[str, str, float, int]:
    """What names a run in results.json: (recipe, condition, noise, seed)."""
    return run["recipe"], run["condition"], float(run["noise"]), int(run["seed"])


def previous_runs(results_path: str, args: argparse.Namespace) -> dict[tuple, dict]:
    """{run key: result} of an earlier invocation into the same --out (an interrupted experiment
    continues where it stopped); {} without one. Results measured with other settings are refused."""
    if not os.path.isfile(results_path):
        return {}
    try:
        with open(results_path, encoding="utf-8") as f:
            saved = json.load(f)
        before, runs = saved["settings"], saved["runs"]
        measured = {run_key(r): r for r in runs}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{results_path} cannot be read as an experiment's results ({type(e).__name__}: {e}); "
                        f"delete it, or use another --out") from None
    differ = [k for k in RESULT_SETTINGS if before.get(k) != vars(args).get(k)]
    if differ:
        shown = "; ".join(f"--{k.replace('_', '-')}: {before.get(k)!r} there, {vars(args).get(k)!r} now"
                          for k in differ)
        raise UserError(f"{results_path} holds runs measured with other settings ({shown}); use another --out, or "
                        f"delete it to start again")
    return measured


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment (or, with --table-only, print the table of its results); returns the table."""
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.seeds, args.noise, args.epochs, args.train_per_class, args.val_per_class = 1, [0.6], 1, 3, 2
    out = os.path.abspath(args.out)
    results_path = os.path.join(out, "results.json")
    if args.table_only:
        if not os.path.isfile(results_path):
            raise UserError(f"--table-only: no {results_path}; run the experiment with --out {args.out} first")
        with open(results_path, encoding="utf-8") as f:
            saved = json.load(f)
        for key in ("recipes", "conditions", "noise", "epochs", "val_per_class"):
            setattr(args, key, saved["settings"][key])
        return report(saved["runs"], args, out, f" ({len(saved['runs'])} of {saved['planned']} runs)")
    os.makedirs(out, exist_ok=True)
    started = time.time()
    measured = previous_runs(results_path, args)
    data = os.path.join(out, "data")
    shutil.rmtree(data, ignore_errors=True)
    texts, files = make_data(data, args.train_per_class, args.val_per_class, args.size)
    image_table, class_table = write_tables(out, texts, files)
    print(f"{len(files)} training and {args.val_per_class * len(class_names())} validation images of "
          f"{len(class_names())} classes under {data}; e.g. {texts[0]!r}", flush=True)
    paths = {"data": data, "image_table": image_table, "class_table": class_table}
    settings = {"epochs": args.epochs, "size": args.size, "resnet_size": args.resnet_size, "lamb": args.lamb}
    runs = [{"recipe": recipe, "condition": condition, "noise": noise, "seed": seed,
             "dir": os.path.join(out, "runs", f"{recipe}_{condition}_noise{noise:g}_seed{seed}")}
            for seed in range(args.seeds) for noise in sorted(args.noise, reverse=True) for recipe in args.recipes
            for condition in args.conditions]  # seed by seed, noisiest first: an interrupted run keeps whole rows
    kept = [measured[run_key(r)] for r in runs if run_key(r) in measured]
    todo = [r for r in runs if run_key(r) not in measured]
    if kept:
        print(f"continuing {results_path}: {len(kept)} of {len(runs)} runs already measured, {len(todo)} to train "
              f"(delete it to measure every run again)", flush=True)

    def save(done: list[dict]) -> None:  # after every run, so that an interrupted experiment keeps what it measured
        atomic_write_json(results_path, {"settings": vars(args), "planned": len(runs), "runs": kept + done})

    results = kept + train_all(todo, paths, settings, args.jobs, out, save)
    table = report(results, args, out)
    print(f"\nexperiment finished in {(time.time() - started) / 60:.1f} min; outputs in {out}: results.json, table.md, "
          f"plot.png, runs/ (log.txt, args.json, train_labels.json of every run), worker*.log", flush=True)
    return table
