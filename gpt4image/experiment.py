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
import json
import math
import os
import random
import re
import shutil
import sys
import time
import zlib

import torch
import torch.nn.functional as F

from .cli import ArgumentParser, at_least, in_range

from .errors import UserError
from .io import atomic_write_json, atomic_write_text, sha256_lines

COLOURS = {"red": (215, 45, 45), "green": (45, 175, 60), "blue": (50, 80, 220)}
SHAPES = ("circle", "square")
CONDITIONS = ("baseline", "image", "class-text", "shuffled", "random")
CLASS_TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "a {} on a plain background.")


def class_names():
    """Class folder names in ImageFolder order (sorted)."""
    return sorted(f"{colour}_{shape}" for colour in COLOURS for shape in SHAPES)


def draw(colour, shape, rng, size):
    """One image: the shape in its colour (jittered), at a random size and place, on a random dark
    background. Returns (PIL image, its irrelevant details as words)."""
    from PIL import Image, ImageDraw
    shade = rng.randint(0, 90)
    img = Image.new("RGB", (size, size), tuple(max(0, shade + rng.randint(-15, 15)) for _ in range(3)))
    fill = tuple(max(0, min(255, v + rng.randint(-30, 30))) for v in COLOURS[colour])
    big = rng.random() < 0.5
    r = rng.uniform(0.3, 0.42) * size if big else rng.uniform(0.18, 0.28) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    d = ImageDraw.Draw(img)
    (d.ellipse if shape == "circle" else d.rectangle)([cx - r, cy - r, cx + r, cy + r], fill=fill)
    where = f"{'upper' if cy < size / 2 else 'lower'} {'left' if cx < size / 2 else 'right'}"
    return img, {"size": "large" if big else "small", "where": where, "background": "black" if shade < 45 else "grey"}


def describe(colour, shape, details):
    """What a describing model that sees the image would write: its attributes and irrelevant detail."""
    return (f"The image shows a {details['size']} {colour} {shape} in the {details['where']} part of the picture "
            f"on a {details['background']} background.")


def make_data(root, train_per_class, val_per_class, size, seed=0):
    """``root/train`` and ``root/val`` (one folder per class) and the training descriptions in
    ImageFolder order; returns (descriptions, relative file list)."""
    rng = random.Random(seed)
    texts, files = [], []
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name in class_names():
            colour, shape = name.split("_")
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(count):
                img, details = draw(colour, shape, rng, size)
                img.save(os.path.join(root, split, name, f"{i:04d}.png"))
                if split == "train":
                    texts.append(describe(colour, shape, details))
                    files.append(f"{name}/{i:04d}.png")
    return texts, files


def bag_of_words(texts, dim=64, seed=0):
    """[len(texts), dim] unit rows, a TF-IDF bag of words: each word's fixed random Gaussian vector (seeded
    by the word's CRC32) weighted by its count x log(M / number of the M texts holding it), summed and
    L2-normalised. Words every text holds weigh nothing; nothing is learned."""
    tokenised = [re.findall(r"[a-z]+", text.lower()) for text in texts]
    holding = {}
    for words in tokenised:
        for w in set(words):
            holding[w] = holding.get(w, 0) + 1
    vectors = {w: torch.randn(dim, generator=torch.Generator().manual_seed(seed * 2 ** 32 + zlib.crc32(w.encode())))
               for w in holding}
    rows = [sum((math.log(len(texts) / holding[w]) * vectors[w] for w in words), torch.zeros(dim))
            for words in tokenised]
    return F.normalize(torch.stack(rows), dim=1)


def write_tables(out, texts, files):
    """The per-image table (row k: training image k) and the per-class table, as description2embedding.py
    would write them (a tensor and its ``.json`` metadata); returns their paths."""
    from .train.class_descriptions import per_class_rows
    image_table = os.path.join(out, "text_emb.pth")
    torch.save(bag_of_words(texts), image_table)
    atomic_write_text(image_table + ".files.txt", "".join(f + "\n" for f in files))
    atomic_write_json(image_table + ".json", {"encoder": "bag-of-words (gpt4image/experiment.py)",
                                              "file_list_sha256": sha256_lines(files),
                                              "file_list": os.path.basename(image_table) + ".files.txt"})
    names = class_names()
    prompts = [template.format(name.replace("_", " ")) for name in names for template in CLASS_TEMPLATES]
    owners = torch.arange(len(names)).repeat_interleave(len(CLASS_TEMPLATES))
    class_table = os.path.join(out, "class_text_emb.pth")
    torch.save(per_class_rows(bag_of_words(prompts), owners, len(names)), class_table)
    atomic_write_json(class_table + ".json", {"encoder": "bag-of-words (gpt4image/experiment.py)", "classes": names})
    return image_table, class_table


def _recipe_main(recipe):
    """The ``main`` of resnet/main.py or deit/main.py (gpt4image.recipes.resnet / .deit)."""
    import importlib
    return importlib.import_module(f"gpt4image.recipes.{recipe}").main


def run_argv(run, paths, settings):
    """The recipe's command line for one run (a dict with recipe, condition, noise, seed, dir)."""
    condition = run["condition"]
    text = {"baseline": ["--text_emb=none"], "class-text": [f"--text_emb={paths['class_table']}"]}.get(
        condition, [f"--text_emb={paths['image_table']}"])
    if condition != "baseline":
        text.append(f"--text-target={condition}")
    common = [f"--epochs={settings['epochs']}", f"--seed={run['seed']}", f"--label-noise={run['noise']}",
              "--checkpoint-every-minutes=0", "-p", "1000", *text]
    if settings.get("lamb") is not None and condition != "baseline":
        common.append(f"--lamb={settings['lamb']}")
    if run["recipe"] == "resnet":
        return [f"--data={paths['data']}", f"--save_dir={run['dir']}", "-a", "resnet18", "-b", "16", "-j", "0",
                "--input-size", str(settings["resnet_size"]), "--lr", "0.05", "--no_scale_lr", *common]
    return [f"--data-path={paths['data']}", f"--output_dir={run['dir']}", "--model", "deit_tiny_patch16_224",
            "--input-size", str(settings["size"]), "--batch-size", "16", "--num_workers", "0", "--lr", "1e-3", "--unscale-lr",
            "--warmup-epochs", "1", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--aa", "none",
            "--drop-path", "0", "--model-ema-decay", "0.9", *common]


def _worker(runs, paths, settings, log_path, queue):
    """Train ``runs`` one after another in this process (one thread), reporting each result."""
    torch.set_num_threads(1)
    with open(log_path, "a") as log:  # this process's output goes to its log from here on
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    mains = {}
    try:
        for run in runs:
            started, cpu = time.time(), time.process_time()
            if run["recipe"] not in mains:
                mains[run["recipe"]] = _recipe_main(run["recipe"])
            shutil.rmtree(run["dir"], ignore_errors=True)
            result = mains[run["recipe"]](run_argv(run, paths, settings))
            for name in ("checkpoint.pth", "best_model.pth.tar", "best_checkpoint.pth", "classifier.pth",
                         "classifier_ema.pth"):
                if os.path.exists(os.path.join(run["dir"], name)):
                    os.unlink(os.path.join(run["dir"], name))
            queue.put(dict(run, acc1=result["final_acc1"], seconds=time.time() - started,
                           cpu_seconds=time.process_time() - cpu))
    except BaseException as e:
        import traceback
        traceback.print_exc()
        queue.put({"error": f"{type(e).__name__}: {e}", "log": log_path})
        raise
    finally:
        queue.put(None)


def train_all(runs, paths, settings, jobs, out, on_result=None):
    """Run every run on ``jobs`` processes; returns them with ``acc1`` and ``seconds``; ``on_result(done)``
    after each."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    shares = [runs[i::jobs] for i in range(jobs)]
    workers = [ctx.Process(target=_worker, args=(share, paths, settings, os.path.join(out, f"worker{i}.log"), queue))
               for i, share in enumerate(shares) if share]
    for w in workers:
        w.daemon = True  # ended with this process
    for w in workers:
        w.start()
    done, finished, started = [], 0, time.time()
    while finished < len(workers):
        item = queue.get()
        if item is None:
            finished += 1
            continue
        if "error" in item:
            for w in workers:
                w.terminate()
            raise RuntimeError(f"a training run failed ({item['error']}); see {item['log']}")
        done.append(item)
        if on_result:
            on_result(done)
        eta = (time.time() - started) / len(done) * (len(runs) - len(done))
        print(f"[{len(done)}/{len(runs)}] {item['recipe']:6s} {item['condition']:10s} noise {item['noise']:.1f} "
              f"seed {item['seed']}: clean top-1 {item['acc1']:.1f}% ({item['seconds']:.0f} s, {item['cpu_seconds']:.0f} s of "
              f"CPU; ~{eta / 60:.0f} min left)",
              flush=True)
    for w in workers:
        w.join()
        if w.exitcode:
            raise RuntimeError(f"a training process failed (exit {w.exitcode}); see {out}/worker*.log")
    return done


def summarise(results, recipes, noises, conditions):
    """{(recipe, noise, condition): (mean, std, n)} of the clean top-1 (std over seeds, n - 1)."""
    table = {}
    for recipe in recipes:
        for noise in noises:
            for condition in conditions:
                values = [r["acc1"] for r in results
                          if (r["recipe"], r["noise"], r["condition"]) == (recipe, noise, condition)]
                if not values:
                    continue
                mean = sum(values) / len(values)
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
                table[recipe, noise, condition] = (mean, std, len(values))
    return table


def markdown(table, recipes, noises, conditions):
    lines = ["| recipe | label noise | " + " | ".join(conditions) + " |",
             "|---|---|" + "---|" * len(conditions)]
    for recipe in recipes:
        for noise in noises:
            cells = [_cell(table.get((recipe, noise, c))) for c in conditions]
            lines.append(f"| {recipe} | {noise:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(entry):
    """mean ± std of one cell; "-" for a cell without runs (an unfinished experiment)."""
    return "-" if entry is None else f"{entry[0]:.1f} ± {entry[1]:.1f}"


def report(results, args, out, note=""):
    """Print the table of ``results``, write table.md and plot.png; returns the table."""
    table = summarise(results, args.recipes, args.noise, args.conditions)
    text = markdown(table, args.recipes, args.noise, args.conditions)
    seeds = sorted({r["seed"] for r in results})
    atomic_write_text(os.path.join(out, "table.md"), text + "\n")
    plot(table, args.recipes, args.noise, args.conditions, os.path.join(out, "plot.png"))
    print(f"\nclean top-1 (%) on {args.val_per_class * len(class_names())} validation images, final epoch, mean ± std "
          f"over seeds {seeds}, {args.epochs} epochs{note}:\n{text}", flush=True)
    return table


def plot(table, recipes, noises, conditions, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(recipes), figsize=(5 * len(recipes), 4), squeeze=False)
    for ax, recipe in zip(axes[0], recipes):
        for condition in conditions:
            points = [(n, *table[recipe, n, condition][:2]) for n in noises if (recipe, n, condition) in table]
            if points:
                xs, means, stds = zip(*points)
                ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=condition)
        ax.set(title=recipe, xlabel="label noise", ylabel="clean top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def get_args_parser():
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


def run_key(run):
    return run["recipe"], run["condition"], float(run["noise"]), int(run["seed"])


def previous_runs(results_path, args):
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
        shown = "; ".join(f"--{k.replace('_', '-')}: {before.get(k)!r} there, {vars(args).get(k)!r} now" for k in differ)
        raise UserError(f"{results_path} holds runs measured with other settings ({shown}); use another --out, or "
                        f"delete it to start again")
    return measured


def main(argv=None):
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

    def save(done):  # after every run, so that an interrupted experiment keeps what it measured
        atomic_write_json(results_path, {"settings": vars(args), "planned": len(runs), "runs": kept + done})

    results = kept + train_all(todo, paths, settings, args.jobs, out, save)
    table = report(results, args, out)
    print(f"\nexperiment finished in {(time.time() - started) / 60:.1f} min; outputs in {out}: results.json, table.md, "
          f"plot.png, runs/ (log.txt, args.json, train_labels.json of every run), worker*.log", flush=True)
    return table


if __name__ == "__main__":
    from .errors import exit_on_user_error
    exit_on_user_error(main, sys.argv[1:])
