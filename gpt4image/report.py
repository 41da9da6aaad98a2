"""Compare runs of either recipe: a Markdown table, and optionally their curves on one figure.

    python -m gpt4image.report RUN_DIR [RUN_DIR ...] [--plot curves.png]

Reads each run's ``args.json`` and ``log.txt``; a run that is still going, or that stopped, is
reported with the epochs it has.
"""
import json
import math
import os
import sys

from .errors import ArgumentParser, UserError, one_line
from .eval_sets import KEY as EVAL_SET_KEY
from .losses import effective_text_weight
from .run_record import read_log


def _warn(message):
    print(f"warning: {message}", file=sys.stderr)


def read_run(run_dir, warn=None):
    """(args.json, log rows) of a run; a blank or broken log line is skipped (and named by ``warn``)."""
    args_path, log_path = os.path.join(run_dir, "args.json"), os.path.join(run_dir, "log.txt")
    if not os.path.isfile(args_path):
        raise UserError(f"{run_dir}: no args.json (is it a run directory?)")
    try:
        with open(args_path, encoding="utf-8") as f:
            args = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {args_path} ({e})") from None
    if not isinstance(args, dict):
        raise UserError(f"{args_path} holds a JSON {type(args).__name__}, not the arguments of a run")
    rows = read_log(log_path, warn) if os.path.isfile(log_path) else []
    return args, rows



def summarise(run_dir):
    args, rows = read_run(run_dir, _warn)
    recipe = "deit" if "model" in args else "resnet"
    model = args.get("model") or args.get("arch")
    text = args.get("text_emb")
    aligned = text is not None and str(text).lower() != "none"
    world = args.get("world_size", 1)
    if aligned and not {"lamb", "loss_type", "tau"} <= set(args):
        raise UserError(f"{os.path.join(run_dir, 'args.json')}: no lamb, loss_type or tau; is it a run of this repo?")
    if aligned:
        gather = ("gather+grad" + (" local" if args.get("local_loss") else "")) if args.get("gather_with_grad") else "released"
        weight = effective_text_weight(args["lamb"], args["loss_type"], args.get("gather_with_grad"), world)
        alignment = f"{args['loss_type']} lamb={args['lamb']} tau={args['tau']} {gather} (eff. {weight:g})"
    else:
        alignment = "off"
    top1 = [r.get("test_acc1") for r in rows]
    ema = [r.get("ema_test_acc1") for r in rows if r.get("ema_test_acc1") is not None]
    state = "done" if rows and rows[-1]["epoch"] + 1 >= args.get("epochs", 0) else "incomplete"
    if recipe == "deit":
        protocol = f"crop {args.get('eval_crop_ratio', 1.0)}"
    else:
        protocol = f"resize {int(args.get('input_size', 224) / 0.875)} crop {args.get('input_size', 224)}"
    fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"  # noqa: E731
    return {
        "run": os.path.basename(os.path.normpath(run_dir)), "recipe": recipe, "model": model, "alignment": alignment,
        "epochs": f"{len(rows)}/{args.get('epochs', '?')} ({state})",
        "final top-1": fmt(top1[-1] if top1 else None), "best top-1": fmt(max(top1) if top1 else None),
        "final EMA": fmt(ema[-1] if ema else None), "best EMA": fmt(max(ema) if ema else None),
        "R@1 i2t/t2i": (f"{rows[-1]['test_i2t_r1']:.1f}/{rows[-1]['test_t2i_r1']:.1f}"
                        if rows and "test_i2t_r1" in rows[-1] else "-"),
        "eval sets (last)": _eval_sets(rows), "eval": protocol, "img/s": f"{rows[-1]['images_per_s']:.0f}" if rows and isinstance(rows[-1].get("images_per_s"), (int, float))
        else "-",
    }


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


def markdown_table(summaries):
    keys = list(summaries[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(s[k]) for k in keys) + " |" for s in summaries]
    return "\n".join(lines)


def plot(run_dirs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with_sets = any(any(k.startswith(EVAL_SET_KEY) for r in read_run(d)[1] for k in r) for d in run_dirs)
    fig, axes = plt.subplots(1, 5 if with_sets else 4, figsize=(25 if with_sets else 20, 4.2))
    for run_dir in run_dirs:
        run_args, rows = read_run(run_dir)
        if not rows:
            continue
        label = os.path.basename(os.path.normpath(run_dir))
        epochs = [r["epoch"] for r in rows]
        line, = axes[0].plot(epochs, [r.get("test_acc1") for r in rows], marker="o", label=label)
        if any("ema_test_acc1" in r for r in rows):
            axes[0].plot(epochs, [r.get("ema_test_acc1") for r in rows], ls="--", color=line.get_color(),
                         label=label + " (EMA)")
        axes[1].plot(epochs, [r.get("train_ce_loss") for r in rows], marker="o", color=line.get_color(), label=label)
        if str(run_args.get("text_emb")).lower() != "none":
            axes[2].plot(epochs, [r.get("train_text_loss") for r in rows], marker="o", color=line.get_color(), label=label)
        if any("test_i2t_r1" in r for r in rows):
            axes[3].plot(epochs, [r.get("test_i2t_r1") for r in rows], marker="o", color=line.get_color(),
                         label=label + " image->text")
            axes[3].plot(epochs, [r.get("test_t2i_r1") for r in rows], ls="--", color=line.get_color(),
                         label=label + " text->image")
        if with_sets:
            _plot_eval_sets(axes[4], rows, label)
    titles = ["test top-1 (%)", "train classification loss", "train text-alignment loss",
              "val retrieval R@1 (%, --val-text-emb)", "eval sets top-1 (%, --eval-set)"]
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if with_sets:
        axes[4].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_eval_sets(ax, rows, label):
    """One marker line per set (often only the last epoch has them), EMA dashed."""
    keys = sorted({k for r in rows for k in r
                   if k.startswith((EVAL_SET_KEY, f"ema_{EVAL_SET_KEY}")) and k.endswith("_acc1")})
    for key in keys:
        points = [(r["epoch"], r[key]) for r in rows if key in r]
        name = key.replace(f"ema_{EVAL_SET_KEY}", "").replace(EVAL_SET_KEY, "")[:-len("_acc1")]
        ax.plot(*zip(*points), marker="o", ls="--" if key.startswith("ema_") else "-",
                label=f"{label} {name}" + (" (EMA)" if key.startswith("ema_") else ""))


def main(argv=None):
    p = ArgumentParser("gpt4image.report", description=__doc__)
    p.add_argument("runs", nargs="+", help="run directories (--save_dir / --output_dir of a recipe)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw test top-1, ce and text loss per epoch")
    args = p.parse_args(argv)
    try:
        summaries = [summarise(r) for r in args.runs]
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    print(markdown_table(summaries), flush=True)  # before the plot: the table is never lost to it
    if args.plot:
        folder = os.path.dirname(os.path.abspath(args.plot))
        try:
            os.makedirs(folder, exist_ok=True)
            plot(args.runs, args.plot)
        except OSError as e:
            print(f"error: cannot write the plot {args.plot!r} ({e.strerror or e}); choose another --plot path",
                  file=sys.stderr)
            return 2
        print(f"\ncurves: {os.path.abspath(args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
