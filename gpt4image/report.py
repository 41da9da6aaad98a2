"""Compare runs of either recipe: a Markdown table, and optionally their curves on one figure.

    python -m gpt4image.report RUN_DIR [RUN_DIR ...] [--plot curves.png]

Reads each run's ``args.json`` and ``log.txt``; a run that is still going, or that stopped, is
reported with the epochs it has.
"""
import argparse
import json
import math
import os
import sys

from .losses import effective_text_weight


def read_run(run_dir):
    args_path, log_path = os.path.join(run_dir, "args.json"), os.path.join(run_dir, "log.txt")
    if not os.path.isfile(args_path):
        raise FileNotFoundError(f"{run_dir}: no args.json (is it a run directory?)")
    with open(args_path) as f:
        args = json.load(f)
    rows = []
    if os.path.isfile(log_path):
        with open(log_path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line being written when the run died
    return args, rows



def summarise(run_dir):
    args, rows = read_run(run_dir)
    recipe = "deit" if "model" in args else "resnet"
    model = args.get("model") or args.get("arch")
    text = args.get("text_emb")
    aligned = text is not None and str(text).lower() != "none"
    world = args.get("world_size", 1)
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
        "eval": protocol, "img/s": f"{rows[-1]['images_per_s']:.0f}" if rows else "-",
    }


def markdown_table(summaries):
    keys = list(summaries[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(s[k]) for k in keys) + " |" for s in summaries]
    return "\n".join(lines)


def plot(run_dirs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run_dir in run_dirs:
        run_args, rows = read_run(run_dir)
        if not rows:
            continue
        label = os.path.basename(os.path.normpath(run_dir))
        epochs = [r["epoch"] for r in rows]
        line, = axes[0].plot(epochs, [r["test_acc1"] for r in rows], marker="o", label=label)
        if any("ema_test_acc1" in r for r in rows):
            axes[0].plot(epochs, [r.get("ema_test_acc1") for r in rows], ls="--", color=line.get_color(),
                         label=label + " (EMA)")
        axes[1].plot(epochs, [r["train_ce_loss"] for r in rows], marker="o", color=line.get_color(), label=label)
        if str(run_args.get("text_emb")).lower() != "none":
            axes[2].plot(epochs, [r["train_text_loss"] for r in rows], marker="o", color=line.get_color(), label=label)
    for ax, title in zip(axes, ["test top-1 (%)", "train classification loss", "train text-alignment loss"]):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser("gpt4image.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (--save_dir / --output_dir of a recipe)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw test top-1, ce and text loss per epoch")
    args = p.parse_args(argv)
    try:
        summaries = [summarise(r) for r in args.runs]
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(summaries))
    if args.plot:
        plot(args.runs, args.plot)
        print(f"\ncurves: {os.path.abspath(args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
