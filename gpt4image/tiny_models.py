"""Write the tiny offline stand-in models, to try the whole pipeline on your own images without a
download:

    python -m gpt4image.tiny_models models/
    python generate_descriptions.py --data my_images/train --model models/tiny_vlm --output d.jsonl
    python description2embedding.py --caption d.jsonl --data my_images/train --model models/tiny_clip.pt

``tiny_vlm/`` is a randomly initialised Qwen2-VL of a few layers (a real architecture, loaded by
transformers like a downloaded model) and ``tiny_clip.pt`` a randomly initialised CLIP in OpenAI's
format with CLIP's real tokenizer. Their descriptions and embeddings are meaningless: they show that
every stage runs on your data, not what real models give.
"""
from __future__ import annotations

import os
import sys

from .cli import ArgumentParser

from .errors import UserError, exit_on_user_error

TINY_MARKER = "TINY_STAND_IN.txt"  # in the VLM folder: generate_descriptions' next step uses tiny_clip.pt beside it


def write_tiny_models(folder: str, family: str = "qwen2_vl") -> tuple[str, str]:
    """``folder/tiny_vlm`` and ``folder/tiny_clip.pt``; returns their paths."""
    from .io import atomic_write_text, ensure_writable_dir
    from .synthetic import save_tiny_clip
    from .describe.tiny_vlm import save_tiny_vlm
    ensure_writable_dir(folder, "folder for the tiny models")
    vlm = save_tiny_vlm(family, os.path.join(folder, "tiny_vlm"))
    atomic_write_text(os.path.join(vlm, TINY_MARKER), "A randomly initialised stand-in written by "
                      "`python -m gpt4image.tiny_models`: its descriptions are meaningless.\n")
    clip = save_tiny_clip(os.path.join(folder, "tiny_clip.pt"))
    return vlm, clip


def main(argv: list[str] | None = None) -> tuple[str, str]:
    """Write the tiny models into the folder given; returns their paths."""
    from .describe.tiny_vlm import FAMILIES
    p = ArgumentParser("python -m gpt4image.tiny_models", description=__doc__)
    p.add_argument("folder", help="where to write tiny_vlm/ and tiny_clip.pt")
    p.add_argument("--family", choices=FAMILIES, default="qwen2_vl", help="architecture of the tiny VLM")
    args = p.parse_args(argv)
    for name in ("tiny_vlm", "tiny_clip.pt"):
        if os.path.exists(os.path.join(args.folder, name)):
            raise UserError(f"{os.path.join(args.folder, name)!r} already exists; choose another folder")
    vlm, clip = write_tiny_models(args.folder, args.family)
    print(f"tiny VLM:  {os.path.abspath(vlm)}\ntiny CLIP: {os.path.abspath(clip)}\n"
          f"next: python generate_descriptions.py --data YOUR_TRAIN_FOLDER --model {vlm} --output descriptions.jsonl",
          flush=True)
    return vlm, clip


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])
