"""The experiment's table: the mean +- std of the clean top-1 over seeds, as markdown and as a plot."""
from __future__ import annotations

import argparse
import math
import os

from ..io import atomic_write_text
from .data import class_names


def summarise(results: list[dict], recipes: list[str], noises: list[float],
              conditions: list[str]) -> dict[tuple, tuple[float, float, int]]:
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


def markdown(table: dict, recipes: list[str], noises: list[float], conditions: list[str]) -> str:
    """The table as markdown: a row per recipe and noise, a column per condition."""
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


def report(results: list[dict], args: argparse.Namespace, out: str, note: str = "") -> dict:
    """Print the table of ``results``, write table.md and plot.png; returns the table."""
    table = summarise(results, args.recipes, args.noise, args.conditions)
    text = markdown(table, args.recipes, args.noise, args.conditions)
    seeds = sorted({r["seed"] for r in results})
    atomic_write_text(os.path.join(out, "table.md"), text + "\n")
    plot(table, args.recipes, args.noise, args.conditions, os.path.join(out, "plot.png"))
    print(f"\nclean top-1 (%) on {args.val_per_class * len(class_names())} validation images, final epoch, mean ± std "
          f"over seeds {seeds}, {args.epochs} epochs{note}:\n{text}", flush=True)
    return table


def plot(table: dict, recipes: list[str], noises: list[float], conditions: list[str], path: str) -> None:
    """Clean top-1 against label noise, a line per condition, a panel per recipe, into ``path``."""
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

