"""Turn one description per training image into the table of text embeddings.

    python description2embedding.py --caption=./minigpt4_caption_imagenet_train_0_1281166.pth
    python description2embedding.py --caption=descriptions.jsonl --data=train/ --model=hf:/models/all-mpnet-base-v2

writes ``imagenet_clip_text_emb_0_1281166.pth`` (an [N, D] tensor of L2-normalised rows, row k for
image k of the ImageFolder train set; [N, K, D] for K descriptions per image, row [i, k] for image i's
description k) and, beside it, ``<output>.json`` describing it. The encoder is
OpenAI CLIP (default RN50, as released), any open_clip model (``open_clip:ARCH[:PRETRAINED]``) or a
transformers text encoder from a local folder (``hf:DIR``).
"""
import argparse
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from .. import __version__
from ..cli import ArgumentParser, at_least, check_device
from ..errors import UserError
from ..io import atomic_torch_save, atomic_write_json, atomic_write_text, sha256_file, sha256_lines
from ..train.class_descriptions import per_class_rows, read_class_descriptions
from .descriptions import DescriptionSet, read_description_set
from .encoder import TextEncoder, load_text_encoder
from .encoding import encode_texts

RELEASED_INPUT = "minigpt4_caption_imagenet_train_0_1281166.pth"  # the authors' descriptions
RELEASED_OUTPUT = "imagenet_clip_text_emb_0_1281166.pth"  # and their table


def default_output(caption: str) -> str:
    """The released table's name for the released descriptions; otherwise named after the input
    (``descriptions.jsonl`` -> ``descriptions_text_emb.pth``), so that a table made for one data set
    is not picked up by a run on another."""
    name = os.path.basename(caption)
    if name == RELEASED_INPUT:
        return RELEASED_OUTPUT
    return os.path.splitext(name)[0] + "_text_emb.pth"


def metadata_path(output: str) -> str:
    """Where the table's metadata is written."""
    return output + ".json"


def file_list_path(output: str) -> str:
    """Where the file list of the table's rows is written."""
    return output + ".files.txt"


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser("description2embedding", description=__doc__)
    p.add_argument("--caption", required=True,
                   help="descriptions: .pth list of str (the released file), .txt, .json or .jsonl")
    p.add_argument("--model", default="RN50",
                   help="OpenAI CLIP: a name from clip.available_models() (RN50 -> 1024-d, ViT-L/14 -> 768-d) or a "
                        "checkpoint path; open_clip:ARCH[:PRETRAINED_TAG_OR_FILE]; or hf:DIR (a transformers text "
                        "encoder: CLIP/SigLIP text towers, BERT, RoBERTa, MPNet, MiniLM, ...)")
    p.add_argument("--download-root", default=None,
                   help="folder holding (or receiving) OpenAI CLIP weights; default ~/.cache/clip")
    p.add_argument("--no-download", action="store_true", help="never download OpenAI CLIP weights; fail if missing")
    p.add_argument("--allow-download", action="store_true",
                   help="let open_clip fetch a pretrained tag into Hugging Face's cache (offline otherwise)")
    p.add_argument("--pooling", choices=["mean", "cls"], default="mean",
                   help="hf: encoders without a projection head: mean over tokens (sentence encoders) or the "
                        "first token")
    p.add_argument("--long-text", choices=["truncate", "chunks"], default="truncate",
                   help="truncate: cut at the encoder's context (as released); chunks: encode sentence-packed "
                        "pieces that fit and average them weighted by their token counts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bs", type=at_least(1), default=1024, help="descriptions encoded per forward pass")
    p.add_argument("--workers", type=at_least(0), default=min(8, os.cpu_count() or 1),
                   help="tokeniser processes working ahead of the model (0: tokenise in this process)")
    p.add_argument("--output", default=None,
                   help=f"table to write (default: named after --caption, in the current folder; {RELEASED_OUTPUT} "
                        f"for the released {RELEASED_INPUT})")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="stored dtype (the released tables are float16)")
    p.add_argument("--data", default=None,
                   help="train folder (ImageFolder), or the text file of image paths given to generate_descriptions: "
                        "orders a path-keyed input and records the file list so that training can verify the pairing")
    p.add_argument("--drop-flagged", action="store_true",
                   help="leave out descriptions that generate_descriptions.py's quality gate flagged: an image whose "
                        "only (or every) description is flagged loses its row (training then uses only the images "
                        "the table lists); a flagged one of several is replaced by another of its image")
    p.add_argument("--per-class", action="store_true",
                   help="--caption maps class folder name -> description(s) (JSON, or JSONL of such objects): "
                        "write a [C, D] table, row c the renormalised mean of class c's encoded descriptions, for "
                        "--text-target class-text (needs --data, whose class folders order the rows)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _input_paths(args):
    """Files this run reads: the descriptions and, when it is a path, the encoder."""
    paths = [args.caption, args.model]
    for prefix in ("hf:", "open_clip:local-dir:", "local-dir:"):
        if args.model.startswith(prefix):
            paths.append(args.model[len(prefix):])
    return [p for p in paths if p and os.path.exists(p)]


def check_output(args: argparse.Namespace) -> None:
    """Refuse an output that is an input of the run, exists (without --force) or cannot be written."""
    targets = [args.output, metadata_path(args.output), file_list_path(args.output)]
    for target in targets:
        for source in _input_paths(args):
            if os.path.realpath(target) == os.path.realpath(source):
                raise UserError(f"--output {args.output!r} would write {target!r}, which is an input of this run "
                                f"({source!r}); choose another --output (--force never overwrites an input)")
    check_device(args.device)
    targets = targets[:2]
    existing = [t for t in targets if os.path.exists(t)]
    if existing and not args.force:
        raise UserError(f"output {existing[0]!r} already exists; pass --force to overwrite it "
                        f"or --output to choose another path")
    directory = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(directory):
        raise UserError(f"cannot write {args.output!r}: directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK):
        raise UserError(f"cannot write {args.output!r}: directory {directory!r} is not writable")


@dataclass(kw_only=True)
class Inputs:
    """The descriptions to encode, flat, in the table's order."""
    texts: list[str]
    files: list[str] | None = None  # the images of the rows, recorded beside the table (None: not known)
    per_image: int = 1  # K descriptions per image: the table is [N, K, D]
    found: DescriptionSet | None = None  # what was read of a file of image descriptions
    owners: list[int] | None = None  # --per-class: the class of each description
    classes: list[str] | None = None  # --per-class: the class folders, in the rows' order


def read_inputs(args: argparse.Namespace) -> Inputs:
    """The descriptions of --caption (per class with --per-class; flagged ones left out with
    --drop-flagged), with what is printed of them."""
    if args.per_class:
        texts, owners, classes = read_class_descriptions(args.caption, args.data)
        print(f"read {len(texts)} descriptions of {len(classes)} classes from {args.caption}", flush=True)
        return Inputs(texts=texts, owners=owners, classes=classes)
    found = read_description_set(args.caption, args.data, args.drop_flagged)
    texts, per_image = found.texts, found.per_image
    if args.drop_flagged and (found.left_out or found.replaced):
        print(f"--drop-flagged: {found.left_out} images left out, {found.replaced} flagged descriptions replaced by "
              f"another of their image ({found.flagged} flagged in all)", flush=True)
    elif args.drop_flagged and found.flagged == 0:
        print(f"--drop-flagged: no record of {args.caption} carries quality flags", flush=True)
    if not texts:
        raise UserError(f"--drop-flagged leaves no image of {args.caption}: every description is flagged; look at the "
                        f"samples in its .json, then describe again (generate_descriptions.py --retry-degenerate)")
    if per_image > 1:
        texts = [t for image in texts for t in image]  # encoded flat, stored as [N, K, D]
    print(f"read {len(texts)} descriptions from {args.caption}"
          + (f" ({per_image} per image)" if per_image > 1 else ""), flush=True)
    return Inputs(texts=texts, files=found.files, per_image=per_image, found=found)


def table_metadata(args: argparse.Namespace, encoder: TextEncoder, embeddings: torch.Tensor, truncated: int,
                   pieces: list[int], inputs: Inputs) -> dict[str, Any]:
    """What ``<output>.json`` says of the table: encoder, shape, dtype, long-text handling, source."""
    found, files = inputs.found, inputs.files
    metadata = {
        "encoder": args.model,
        "family": encoder.family,
        "pooling": encoder.pooling,
        "embedding_dim": embeddings.shape[-1],
        "num_rows": embeddings.shape[0],
        "dtype": args.dtype,
        "long_text": args.long_text,
        "num_truncated": truncated,
        "context_length": encoder.context_length,
        "source": os.path.basename(args.caption),
        "source_sha256": sha256_file(args.caption),
        "tool": "description2embedding.py",
        "tool_version": __version__,
        "versions": encoder.extra.get("versions", {}),
    }
    if inputs.per_image > 1:
        metadata["descriptions_per_image"] = inputs.per_image
    if found is not None and found.flagged:
        metadata["flagged"] = found.flagged
    if args.drop_flagged and found is not None:
        metadata["drop_flagged"] = {"images_left_out": found.left_out, "descriptions_replaced": found.replaced,
                                    "images_in_folder": len(files) + found.left_out}
    if args.long_text == "chunks":
        metadata["pieces_per_description"] = {"mean": sum(pieces) / len(pieces), "max": max(pieces)}
    if args.per_class:
        metadata.update(per_class=True, classes=inputs.classes,
                        descriptions_per_class=len(inputs.texts) / len(inputs.classes))
    if files is not None:
        metadata["file_list_sha256"] = sha256_lines(files)
        metadata["file_list"] = os.path.basename(file_list_path(args.output))
    return metadata


def main(argv: list[str] | None = None) -> str:
    """description2embedding.py: write the table of --caption's descriptions; returns its path."""
    args = get_args_parser().parse_args(argv)
    if args.per_class and args.drop_flagged:
        raise UserError("--drop-flagged leaves out what generate_descriptions.py's quality gate flagged in a file of "
                        "image descriptions; a --per-class file has no such flags: drop one of the two flags")
    if args.output is None:
        args.output = default_output(args.caption)
    check_output(args)
    started = time.time()
    inputs = read_inputs(args)
    texts, per_image = inputs.texts, inputs.per_image
    encoder = load_text_encoder(args.model, args.device, args.download_root, allow_download=not args.no_download,
                                allow_hub_download=args.allow_download, pooling=args.pooling)
    dtype = getattr(torch, args.dtype)
    embeddings, truncated, pieces = encode_texts(encoder, texts, batch_size=args.bs, num_workers=args.workers,
                                                 out_dtype=dtype, chunks=args.long_text == "chunks",
                                                 progress=not args.quiet,
                                                 pin_memory=torch.device(args.device).type == "cuda")
    if not torch.isfinite(embeddings).all():
        bad = (~torch.isfinite(embeddings)).any(dim=1).nonzero()[0].item() // per_image
        raise UserError(f"the encoder produced non-finite values (first at row {bad}); "
                        f"try --dtype float32 or check the model {args.model!r}")
    if per_image > 1:
        embeddings = embeddings.view(-1, per_image, embeddings.shape[1])
    if args.per_class:
        embeddings = per_class_rows(embeddings, inputs.owners, len(inputs.classes)).to(dtype)
    metadata = table_metadata(args, encoder, embeddings, truncated, pieces, inputs)
    if inputs.files is not None:
        atomic_write_text(file_list_path(args.output), "".join(f + "\n" for f in inputs.files))
    atomic_torch_save(embeddings, args.output)
    atomic_write_json(metadata_path(args.output), metadata)
    rate = len(texts) / max(time.time() - started, 1e-9)
    cut = (f"{truncated} truncated at {encoder.context_length} tokens" if args.long_text == "truncate" else
           f"{sum(pieces) / len(pieces):.2f} pieces per description, at most {max(pieces)}")
    print(f"{len(texts)} descriptions ({cut}) -> {' x '.join(map(str, embeddings.shape))} {args.dtype} embeddings, "
          f"{rate:.0f} descriptions/s overall", flush=True)
    print(f"embeddings: {os.path.abspath(args.output)}", flush=True)
    print(f"metadata:   {os.path.abspath(metadata_path(args.output))}", flush=True)
    return args.output
