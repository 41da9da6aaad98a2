"""Compare runs of either recipe: a Markdown table, and optionally their curves on one figure.

    python -m gpt4image.report RUN_DIR [RUN_DIR ...] [--plot curves.png]

Reads each run's ``args.json`` and ``log.txt``; a run that is still going, or that stopped, is
reported with the epochs it has. A folder of runs is reported run by run; a folder whose args.json
is another tool's is skipped with a note.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from .cli import ArgumentParser
from .errors import UserError, one_line
from .train.eval_sets import KEY as EVAL_SET_KEY
from .train.alignment import effective_text_weight
from .train.run_record import read_log

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn
    from matplotlib.figure import Figure


RECIPES = ("resnet", "deit")
SKIPPED_DIRS = ("tensorboard", "wandb")


def _warn(message):
    print(f"warning: {message}", file=sys.stderr)


def find_runs(path: str) -> list[str]:
    """The run folders at or below ``path``: ``path`` itself when it holds an args.json, else every
    folder below it that does (not looking inside a run); a UserError when there is none."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such folder; pass run folders (--save_dir / --output_dir of a recipe) or a "
                        f"folder holding them")
    if os.path.isfile(os.path.join(path, "args.json")):
        return [path]
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith("."))
        if "args.json" in files:
            found.append(root)
            dirs[:] = []
    if not found:
        raise UserError(f"{path}: no args.json in it or in any folder below it (is it a run directory?)")
    return found


def read_run(run_dir: str, warn: Callable[[str], None] | None = None) -> tuple[dict, list[dict]]:
    """(args.json, log rows) of a run; a blank or broken log line is skipped (and named by ``warn``)."""
    args_path, log_path = os.path.join(run_dir, "args.json"), os.path.join(run_dir, "log.txt")
    if not os.path.isfile(args_path):
        raise UserError(f"{run_dir}: no args.json (is it a run directory?)")
    try:
        with open(args_path, encoding="utf-8") as f:
            args = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"cannot read {args_path} ({e})") from None
    if not isinstance(args, dict):
        raise UserError(f"{args_path} holds a JSON {type(args).__name__}, not the arguments of a run")
    rows = read_log(log_path, warn) if os.path.isfile(log_path) else []
    return args, rows


def recipe_of(args: dict) -> str | None:
    """'resnet' or 'deit' for the args.json of one of our runs (recorded since it was added, else
    recognised by the flags only our recipes have); None for another tool's args.json."""
    if args.get("recipe") in RECIPES:
        return args["recipe"]
    if "recipe" in args or not {"epochs", "text_emb"} <= set(args):
        return None
    if "model" in args and "output_dir" in args or "model" in args and "nb_classes" in args:
        return "deit"
    if "arch" in args:
        return "resnet"
    return "deit" if "model" in args else None


def _number(value):
    """A finite number read from a log row or args.json, else None (a row may hold anything)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def summarise(run_dir: str, run: tuple[dict, list[dict]] | None = None, label: str | None = None) -> dict:
    """One table row for a run; ``run`` is its (args, rows) when already read."""
    args, rows = run if run is not None else read_run(run_dir, _warn)
    recipe = recipe_of(args) or ("deit" if "model" in args else "resnet")
    model = args.get("model") or args.get("arch")
    text = args.get("text_emb")
    aligned = text is not None and str(text).lower() != "none"
    world = _number(args.get("world_size")) or 1
    if aligned and not {"lamb", "loss_type", "tau"} <= set(args):
        raise UserError(f"{os.path.join(run_dir, 'args.json')}: no lamb, loss_type or tau; is it a run of this repo?")
    if aligned:
        gather = (("gather+grad" + (" local" if args.get("local_loss") else "")) if args.get("gather_with_grad")
                  else "released")
        try:
            weight = f"{effective_text_weight(args['lamb'], args['loss_type'], args.get('gather_with_grad'), world):g}"
        except (TypeError, ValueError, KeyError):
            weight = "?"
        alignment = f"{args['loss_type']} lamb={args['lamb']} tau={args['tau']} {gather} (eff. {weight})"
        if args.get("text_target", "image") != "image":
            alignment += f" target={args['text_target']}"
    else:
        alignment = "off"
    alignment += _labels(args)
    top1 = [_number(r.get("test_acc1")) for r in rows]
    top1 = [v for v in top1 if v is not None]
    ema = [v for v in (_number(r.get("ema_test_acc1")) for r in rows) if v is not None]
    epochs = _number(args.get("epochs"))
    state = "done" if rows and epochs is not None and rows[-1]["epoch"] + 1 >= epochs else "incomplete"
    size = _number(args.get("input_size")) or 224
    if recipe == "deit":
        protocol = f"crop {args.get('eval_crop_ratio', 1.0)}"
    else:
        protocol = f"resize {int(size / 0.875)} crop {size}"
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    last = rows[-1] if rows else {}
    i2t, t2i = _number(last.get("test_i2t_r1")), _number(last.get("test_t2i_r1"))
    rate = _number(last.get("images_per_s"))
    return {
        "run": label or os.path.basename(os.path.normpath(run_dir)), "recipe": recipe, "model": model,
        "alignment": alignment, "epochs": f"{len(rows)}/{args.get('epochs', '?')} ({state})",
        "final top-1": fmt(top1[-1] if top1 else None), "best top-1": fmt(max(top1) if top1 else None),
        "final EMA": fmt(ema[-1] if ema else None), "best EMA": fmt(max(ema) if ema else None),
        "R@1 i2t/t2i": f"{i2t:.1f}/{t2i:.1f}" if i2t is not None and t2i is not None else "-",
        "eval sets (last)": _eval_sets(rows), "eval": protocol, "img/s": f"{rate:.0f}" if rate is not None else "-",
    }


def _labels(args):
    """'; labels: noise 0.4, 10 shots' when the run chose its labels (--label-noise, --shots,
    --train-fraction); '' for the paper's."""
    chosen = [f"noise {args['label_noise']:g}" if _number(args.get("label_noise")) else "",
              f"{args['shots']} shots" if args.get("shots") else "",
              f"fraction {args['train_fraction']:g}" if (_number(args.get("train_fraction")) or 1) < 1 else ""]
    chosen = [c for c in chosen if c]
    return f"; labels: {', '.join(chosen)}" if chosen else ""


def _eval_sets(rows):
    """The --eval-set top-1 of the last row that has any: 'r 36.1 (EMA 37.0), v2 ...'."""
    last = next((r for r in reversed(rows) if any(k.startswith(EVAL_SET_KEY) for k in r)), {})
    parts = []
    for key, value in last.items():
        if key.startswith(EVAL_SET_KEY) and key.endswith("_acc1"):
            ema = last.get(f"ema_{key}")
            name = key[len(EVAL_SET_KEY):-len("_acc1")]
            parts.append(f"{name} {value:.1f}" + (f" (EMA {ema:.1f})" if ema is not None else ""))
    return ", ".join(parts) or "-"


def markdown_table(summaries: list[dict]) -> str:
    """The rows of ``summarise`` as one Markdown table."""
    keys = list(summaries[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(s[k]) for k in keys) + " |" for s in summaries]
    return "\n".join(lines)


def chance_text_loss(args: dict) -> tuple[float, int] | None:
    """(loss of an alignment that has learnt nothing, the images it assumes) for the clip and ctr
    losses: log(N) over the N images a loss compares at a time: clip the global batch (batch x
    processes, x --accum-iter under exact accumulation), ctr the local batch; None for byol and the
    other losses, a baseline, or an args.json without the batch size."""
    batch, world = _number(args.get("batch_size")), _number(args.get("world_size")) or 1
    if args.get("loss_type") not in ("clip", "ctr") or str(args.get("text_emb")).lower() == "none" or not batch:
        return None
    compared = batch
    if args["loss_type"] == "clip":
        exact = args.get("accum_alignment") == "exact"  # absent before exact accumulation: per batch
        compared *= world * ((_number(args.get("accum_iter")) or 1) if exact else 1)
    compared = int(compared)
    return (math.log(compared), compared) if compared > 1 else None


def plot(runs: list[tuple], path: str) -> None:
    """Draw ``curves_figure(runs)`` into ``path``."""
    import matplotlib.pyplot as plt
    fig = curves_figure(runs)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves_figure(runs: list[tuple]) -> Figure:
    """``runs``: [(label, folder, args, rows)]. Test top-1, the two training losses (the text loss with its
    chance level) and, when any run measured it, retrieval on val; whole epochs on the x axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    retrieval = any("test_i2t_r1" in r for _, _, _, rows in runs for r in rows)
    with_sets = any(k.startswith(EVAL_SET_KEY) for _, _, _, rows in runs for r in rows for k in r)
    titles = ["test top-1 (%)", "train classification loss", "train text-alignment loss"]
    titles += ["val retrieval R@1 (%, --val-text-emb)"] * retrieval + ["eval sets top-1 (%, --eval-set)"] * with_sets
    fig, axes = plt.subplots(1, len(titles), figsize=(5 * len(titles), 4.2))
    series = lambda rows, key: [_number(r.get(key)) for r in rows]  # noqa: E731  (None: a gap)
    for label, _, run_args, rows in runs:
        if not rows:
            continue
        epochs = [r["epoch"] for r in rows]
        line, = axes[0].plot(epochs, series(rows, "test_acc1"), marker="o", label=label)
        color = line.get_color()
        if any("ema_test_acc1" in r for r in rows):
            axes[0].plot(epochs, series(rows, "ema_test_acc1"), ls="--", color=color, label=label + " (EMA)")
        axes[1].plot(epochs, series(rows, "train_ce_loss"), marker="o", color=color, label=label)
        if str(run_args.get("text_emb")).lower() != "none":
            axes[2].plot(epochs, series(rows, "train_text_loss"), marker="o", color=color, label=label)
            chance = chance_text_loss(run_args)
            if chance:
                axes[2].axhline(chance[0], ls=":", color=color,
                                label=f"{label}: chance, log({chance[1]}) = {chance[0]:.2f} "
                                      f"({'global' if run_args['loss_type'] == 'clip' else 'local'} "
                                      f"batch of args.json)")
        if retrieval and any("test_i2t_r1" in r for r in rows):
            axes[3].plot(epochs, series(rows, "test_i2t_r1"), marker="o", color=color, label=label + " image->text")
            axes[3].plot(epochs, series(rows, "test_t2i_r1"), ls="--", color=color, label=label + " text->image")
        if with_sets:
            _plot_eval_sets(axes[-1], rows, label)
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in [axes[0], *axes[2:]]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def collect(paths: list[str], warn: Callable[[str], None] = _warn) -> list[tuple[str, str, dict, list[dict]]]:
    """[(label, folder, args, rows)] of every run at or below ``paths``; a folder holding another tool's
    args.json is skipped with a note."""
    runs = []
    for given in paths:
        found = find_runs(given)
        for run_dir in found:
            args, rows = read_run(run_dir, warn)
            if recipe_of(args) is None:
                warn(f"skipped {run_dir}: its args.json is not one of a run of resnet/main.py or deit/main.py (no "
                     f"'recipe' in it, and not their flags)")
                continue
            label = os.path.basename(os.path.normpath(run_dir))
            if len(found) > 1 or os.path.normpath(run_dir) != os.path.normpath(given):
                label = os.path.join(os.path.basename(os.path.normpath(given)), os.path.relpath(run_dir, given))
            runs.append((label, run_dir, args, rows))
    if not runs:
        raise UserError(f"no run of resnet/main.py or deit/main.py in {', '.join(paths)}")
    return runs


def _plot_eval_sets(ax, rows, label):
    """One marker line per set (often only the last epoch has them), EMA dashed."""
    keys = sorted({k for r in rows for k in r
                   if k.startswith((EVAL_SET_KEY, f"ema_{EVAL_SET_KEY}")) and k.endswith("_acc1")})
    for key in keys:
        points = [(r["epoch"], r[key]) for r in rows if key in r]
        name = key.replace(f"ema_{EVAL_SET_KEY}", "").replace(EVAL_SET_KEY, "")[:-len("_acc1")]
        ax.plot(*zip(*points), marker="o", ls="--" if key.startswith("ema_") else "-",
                label=f"{label} {name}" + (" (EMA)" if key.startswith("ema_") else ""))


def main(argv: list[str] | None = None) -> int:
    """Print the table of the runs given (and draw their curves with --plot); the exit status."""
    p = ArgumentParser("gpt4image.report", description=__doc__)
    p.add_argument("runs", nargs="+", help="run directories (--save_dir / --output_dir of a recipe), or folders "
                                            "holding them (each run below is reported)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw test top-1, ce and text loss per epoch")
    args = p.parse_args(argv)
    try:
        runs = collect(args.runs)
        summaries = [summarise(run_dir, (run_args, rows), label) for label, run_dir, run_args, rows in runs]
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    print(markdown_table(summaries), flush=True)  # before the plot: the table is never lost to it
    if args.plot:
        folder = os.path.dirname(os.path.abspath(args.plot))
        try:
            os.makedirs(folder, exist_ok=True)
            plot(runs, args.plot)
        except OSError as e:
            print(f"error: cannot write the plot {args.plot!r} ({e.strerror or e}); choose another --plot path",
                  file=sys.stderr)
            return 2
        print(f"\ncurves: {os.path.abspath(args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
