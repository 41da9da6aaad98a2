"""Turn one description per training image into the table of CLIP text embeddings.

    python description2embedding.py --caption=./minigpt4_caption_imagenet_train_0_1281166.pth

writes ``imagenet_clip_text_emb_0_1281166.pth`` (an [N, D] tensor of L2-normalised rows, row k for
image k of the ImageFolder train set) and, beside it, ``<output>.json`` describing it.
"""
import argparse
import os
import sys
import time

import gpt4image  # noqa: F401  (makes torchvision importable first)
import torch

from gpt4image import __version__
from gpt4image.clip_text import encode_descriptions, load_clip, resolve_clip_weights
from gpt4image.descriptions import read_descriptions
from gpt4image.errors import UserError, exit_on_user_error
from gpt4image.io import atomic_torch_save, atomic_write_json, atomic_write_text, sha256_file, sha256_lines

DEFAULT_OUTPUT = "imagenet_clip_text_emb_0_1281166.pth"


def metadata_path(output):
    return output + ".json"


def file_list_path(output):
    return output + ".files.txt"


def get_args_parser():
    p = argparse.ArgumentParser("description2embedding", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--caption", required=True,
                   help="descriptions: .pth list of str (the released file), .txt, .json or .jsonl")
    p.add_argument("--model", default="RN50",
                   help="CLIP model: a name from clip.available_models() (RN50 -> 1024-d, ViT-L/14 -> 768-d) "
                        "or the path of a checkpoint file")
    p.add_argument("--download-root", default=None,
                   help="folder holding (or receiving) CLIP weights; default ~/.cache/clip")
    p.add_argument("--no-download", action="store_true", help="never download weights; fail if missing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bs", type=int, default=1024, help="descriptions encoded per forward pass")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="tokeniser processes working ahead of the model (0: tokenise in this process)")
    p.add_argument("--output", default=DEFAULT_OUTPUT)
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="stored dtype (the released tables are float16)")
    p.add_argument("--data", default=None,
                   help="train folder (ImageFolder): orders a path-keyed input and records the file list "
                        "so that training can verify the pairing")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check_output(args):
    targets = [args.output, metadata_path(args.output)]
    existing = [t for t in targets if os.path.exists(t)]
    if existing and not args.force:
        raise UserError(f"output {existing[0]!r} already exists; pass --force to overwrite it "
                        f"or --output to choose another path")
    directory = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(directory):
        raise UserError(f"cannot write {args.output!r}: directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK):
        raise UserError(f"cannot write {args.output!r}: directory {directory!r} is not writable")
    if args.bs < 1:
        raise UserError(f"--bs must be at least 1, got {args.bs}")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    check_output(args)
    started = time.time()
    texts, files = read_descriptions(args.caption, args.data)
    print(f"read {len(texts)} descriptions from {args.caption}", flush=True)
    weights = resolve_clip_weights(args.model, args.download_root, allow_download=not args.no_download)
    model = load_clip(weights, args.device)
    dtype = getattr(torch, args.dtype)
    embeddings, truncated = encode_descriptions(model, texts, args.device, batch_size=args.bs,
                                                num_workers=args.workers, out_dtype=dtype,
                                                progress=not args.quiet)
    if not torch.isfinite(embeddings).all():
        bad = (~torch.isfinite(embeddings)).any(dim=1).nonzero()[0].item()
        raise UserError(f"the encoder produced non-finite values (first at row {bad}); "
                        f"try --dtype float32 or check the checkpoint {weights!r}")
    metadata = {
        "encoder": args.model,
        "embedding_dim": embeddings.shape[1],
        "num_rows": embeddings.shape[0],
        "dtype": args.dtype,
        "num_truncated": truncated,
        "context_length": 77,
        "source": os.path.basename(args.caption),
        "source_sha256": sha256_file(args.caption),
        "tool": "description2embedding.py",
        "tool_version": __version__,
    }
    if files is not None:
        metadata["file_list_sha256"] = sha256_lines(files)
        metadata["file_list"] = os.path.basename(file_list_path(args.output))
        atomic_write_text(file_list_path(args.output), "".join(f + "\n" for f in files))
    atomic_torch_save(embeddings, args.output)
    atomic_write_json(metadata_path(args.output), metadata)
    rate = len(texts) / max(time.time() - started, 1e-9)
    print(f"{len(texts)} descriptions ({truncated} truncated at 77 tokens) -> {embeddings.shape[0]} x "
          f"{embeddings.shape[1]} {args.dtype} embeddings, {rate:.0f} descriptions/s overall", flush=True)
    print(f"embeddings: {os.path.abspath(args.output)}", flush=True)
    print(f"metadata:   {os.path.abspath(metadata_path(args.output))}", flush=True)
    return args.output


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])
