"""Several descriptions per image: K prompts from a file, or K sampled answers to one prompt.

Description k of an image is one task, ``Task(image, k)``; its record carries ``"k"``. A run of K
descriptions is K passes over the images (k-major, so that every batch asks one prompt or one
seed); the merge writes the records image by image, k = 0..K-1 within each. With K = 1 nothing
changes: tasks are the images themselves and records have no ``"k"``.
"""
import argparse
from dataclasses import dataclass
from typing import Any

from ..cli import at_least
from ..errors import UserError
from .listing import ImageItem
from .prompts import PromptBuilder


@dataclass(frozen=True, kw_only=True)
class Task(ImageItem):
    k: int = 0


def add_multi_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--num-descriptions", type=at_least(1), default=None, metavar="K",
                   help="descriptions per image: one per line of --prompt-file, or K sampled answers to the prompt "
                        "with --do-sample (answer k seeded by --seed and k); records carry their index \"k\"")
    p.add_argument("--prompt-file", default=None, metavar="FILE",
                   help="one prompt per line (a {class_name} placeholder is filled from the class folder); "
                        "description k of each image answers line k")
    return p


def read_prompt_file(path: str) -> list[str]:
    """The non-empty lines of ``--prompt-file``, stripped."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --prompt-file {path!r} ({e}); pass a UTF-8 text file with one prompt per line") \
            from None
    if not prompts:
        raise UserError(f"--prompt-file {path!r} holds no prompt; write one prompt per line")
    return prompts


def resolve_descriptions(args: argparse.Namespace) -> int:
    """Sets ``args.prompts`` (the K prompts, or None) and ``args.num_descriptions`` (K); bad
    combinations are UserErrors."""
    prompts = read_prompt_file(args.prompt_file) if args.prompt_file else None
    k = args.num_descriptions or (len(prompts) if prompts else 1)
    if prompts and len(prompts) != k:
        raise UserError(f"--num-descriptions {k} but --prompt-file {args.prompt_file!r} has {len(prompts)} prompts; "
                        f"give one prompt per description (or leave --num-descriptions out)")
    if prompts and args.class_prompt:
        raise UserError("--prompt-file and --class-prompt both set the prompt; put {class_name} in the file's lines")
    if k > 1 and not prompts and not args.do_sample:
        raise UserError(f"--num-descriptions {k} with one prompt and greedy decoding gives {k} copies of one text; "
                        f"add --do-sample (K seeded samples) or --prompt-file (K prompts)")
    args.prompts, args.num_descriptions = prompts, k
    return k


def tasks_of(items: list[ImageItem], k: int, image_major: bool = False) -> list[ImageItem]:
    """The tasks of ``items``: the items themselves when k == 1; else (image, j) for j < k,
    k-major (describing order) or image-major (the merged file's order)."""
    if k == 1:
        return list(items)
    pairs = ((item, j) for item in items for j in range(k)) if image_major else \
        ((item, j) for j in range(k) for item in items)
    return [Task(index=item.index, path=item.path, file=item.file, class_name=item.class_name, k=j)
            for item, j in pairs]


class TaskPrompts:
    """The chat prompt of a task: prompt k of the file (filled with the class name where it has a
    ``{class_name}`` placeholder), else the run's single prompt."""

    def __init__(self, processor: Any, prompt: str, class_template: str | None, class_names: dict[str, str] | None,
                 prompts: list[str] | None = None):
        if prompts:
            self.builders = [PromptBuilder(processor, p, p if "{class_name}" in p else None, class_names)
                             for p in prompts]
        else:
            self.builders = [PromptBuilder(processor, prompt, class_template, class_names)]

    def __call__(self, task: ImageItem) -> str:
        return self.builders[getattr(task, "k", 0) % len(self.builders)](task)
