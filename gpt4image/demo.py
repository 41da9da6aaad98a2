"""The main job on built-in generated data: no download, no GPU.

    python -m gpt4image.demo [--out gpt4image_demo]

Generates a small ImageFolder with one description per training image and a tiny random CLIP,
then runs description2embedding.py on them.
"""
import argparse
import os
import subprocess
import sys

import torch

from .synthetic import describe_image_folder, make_image_folder, save_tiny_clip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, cwd):
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def prepare_data(out):
    """Images, descriptions, tiny CLIP and the embedding table under ``out``; returns their paths."""
    data = os.path.join(out, "data")
    if not os.path.isdir(os.path.join(data, "train")):
        print(f"generating images under {data}", flush=True)
        make_image_folder(data, num_classes=4, train_per_class=32, val_per_class=10, size=32)
    captions = os.path.join(out, "descriptions.pth")
    texts, _ = describe_image_folder(os.path.join(data, "train"))
    torch.save(texts, captions)
    clip_path = save_tiny_clip(os.path.join(out, "tiny_clip.pt"))
    emb = os.path.join(out, "text_emb.pth")
    _run([sys.executable, os.path.join(REPO, "description2embedding.py"), f"--caption={captions}",
          f"--model={clip_path}", f"--output={emb}", f"--data={os.path.join(data, 'train')}", "--force",
          "--workers=2"], cwd=out)
    return {"data": data, "descriptions": captions, "clip": clip_path, "embeddings": emb}


def main(argv=None):
    p = argparse.ArgumentParser("gpt4image.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpt4image_demo", help="folder for everything the demo makes")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    paths = prepare_data(out)
    print("\ndemo outputs:")
    for name, path in paths.items():
        print(f"  {name:12s} {path}")


if __name__ == "__main__":
    main()
