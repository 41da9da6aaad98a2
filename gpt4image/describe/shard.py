"""Describing one shard of the images: the backend that answers (transformers' ``generate`` or
vLLM's engine), the images decoded ahead of it, each answer appended to the shard's part file as
it comes, and the --retry-degenerate pass over the answers the quality gate flagged."""
import argparse
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError
from ..train.resumable import mix_seed
from .hf import Result, batch_results, generate
from .listing import ImageItem
from .loading import PromptBatches, TimedLoader, loader_worker_init
from .models import VLMSource, inspect_vlm, load_vlm, resolve_dtype
from .multi import TaskPrompts, tasks_of
from .parts import Parts
from .preprocess import apply_pixel_budget
from .quality import RETRY_SETTINGS, QualityGate
from .records import EMPTY, task_key, write_results
from .settings import run_settings
from .vllm_engine import VLLMEngine


def parse_shard(text: str) -> tuple[int, int]:
    """``(I, N)`` of ``--shard I/N``."""
    m = re.fullmatch(r"(\d+)/(\d+)", text or "")
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise UserError(f"--shard {text!r} must be I/N with 0 <= I < N, e.g. --shard 0/4")
    return int(m.group(1)), int(m.group(2))


def launch_run_id() -> str:
    """The same string on every rank of one launch (torchrun's run id, SLURM's job step)."""
    env = os.environ
    if env.get("TORCHELASTIC_RUN_ID"):
        return env["TORCHELASTIC_RUN_ID"]
    if env.get("SLURM_JOB_ID"):
        return f"{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', 0)}"
    return f"{env.get('MASTER_ADDR', 'local')}-{env.get('MASTER_PORT', '0')}"


@dataclass(kw_only=True)
class Backend:
    """How a shard's batches become answers: ``results_of(loader, overrides=None)`` yields lists of
    ``(item, description, reason it failed, hit the token limit)`` (``overrides``: a retry's
    generation settings); ``loader_batch``: images decoded per loader item; ``preprocess``: whether
    the loader runs the processor (transformers) or hands images over (vLLM preprocesses itself)."""
    name: str  # as the metadata records it
    loader_batch: int
    preprocess: bool
    results_of: Callable[..., Iterator[list[Result]]]


def transformers_backend(args: argparse.Namespace, source: VLMSource, device: str,
                         generation: dict[str, Any]) -> Backend:
    """``generate`` on batches of ``--batch-size`` images; a sampled run of several descriptions
    (or a sampled retry) seeds each batch from (seed, k, first image), so that it is reproducible."""
    model = load_vlm(source.directory, device, source.info["dtype"])
    several = args.num_descriptions > 1

    def results_of(loader, overrides=None):
        settings = dict(generation, **(overrides or {}))
        seeded = (several and args.do_sample) or (overrides or {}).get("do_sample")

        def describe(batch, inputs):
            if seeded:  # one seed per batch: (seed, k, first image) or, for a retry, (seed, first image)
                torch.manual_seed(mix_seed(args.seed, -1 if overrides else getattr(batch[0], "k", 0),
                                           batch[0].index))
            return generate(model, source.processor, inputs, device, settings, with_limit=True)
        return batch_results(loader, describe)
    return Backend(name="transformers", loader_batch=args.batch_size, preprocess=True, results_of=results_of)


def vllm_backend(args: argparse.Namespace, source: VLMSource, device: str, generation: dict[str, Any],
                 index: int) -> Backend:
    """vLLM's engine holding ``--batch-size`` requests in flight, seeded by seed + shard index."""
    vocab = source.config.get_text_config().vocab_size
    pixels = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v}
    engine = VLLMEngine(source.directory, device, source.info["dtype"], generation, vocab,
                        args.gpu_memory_utilization, args.seed + index, pixels)
    return Backend(name=f"vllm {engine.version}",
                   loader_batch=min(args.batch_size, 32),  # images decoded per loader item; the engine holds more
                   preprocess=False,
                   results_of=lambda loader, overrides=None: engine.stream(loader, args.batch_size, overrides))


@dataclass(kw_only=True)
class ShardPass:
    """Describing a list of tasks of one shard and appending the answers to its part file."""
    args: argparse.Namespace
    backend: Backend
    processor: Any
    prompts: Callable[[ImageItem], str]
    parts: Parts
    shard: tuple[int, int]
    quiet: bool

    def __call__(self, tasks: list[ImageItem], overrides: dict[str, Any] | None = None,
                 retried: dict | None = None) -> None:
        """Describe ``tasks`` (with a retry's ``overrides`` and the ``retried`` records) and print the
        rate and the share of the time the model waited for the loader."""
        args, (index, count) = self.args, self.shard
        batches = PromptBatches(tasks, self.backend.loader_batch, self.processor, self.prompts,
                                preprocess=self.backend.preprocess, max_pixels=args.loader_max_pixels)
        loader = TimedLoader(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=args.workers,
                                                         prefetch_factor=4 if args.workers else None,
                                                         worker_init_fn=loader_worker_init))
        started = time.perf_counter()
        write_results(self.backend.results_of(loader, overrides), self.parts, self.shard, len(tasks), self.quiet,
                      args.gate, retried)
        total = time.perf_counter() - started
        if tasks and total > 0:
            print(f"shard {index}/{count}: {len(tasks)} descriptions in {total:.1f} s ({len(tasks) / total:.2f}/s; "
                  f"waiting for the loader {100 * loader.waited / total:.1f}% of the time)", flush=True)


def describe_shard(args: argparse.Namespace, items: list[ImageItem], class_names: dict[str, str] | None,
                   shard: tuple[int, int], device: str, quiet: bool) -> dict[str, Any]:
    """Describe the images of shard ``(index, count)`` not described yet (each of its K
    descriptions); append their records; with --retry-degenerate, describe the flagged ones again.
    Returns the model's metadata (``inspect_vlm``'s info, dtype, backend)."""
    index, count = shard
    source = inspect_vlm(args.model, args.allow_download)
    info = source.info
    info["dtype"] = resolve_dtype(args.dtype, device)
    budget = apply_pixel_budget(source.processor, args.max_pixels, args.min_pixels, args.model)
    if budget:
        info["min_pixels"], info["max_pixels"] = budget
    parts = Parts(args.output)
    settings = run_settings(args, info)
    parts.check_settings(settings, shard)
    if quiet:
        from transformers.utils.logging import disable_progress_bar
        disable_progress_bar()
    generation = {k: v for k, v in settings["generation"].items() if k != "seed"}
    if args.backend == "vllm":
        backend = vllm_backend(args, source, device, generation, index)
    else:
        backend = transformers_backend(args, source, device, generation)
    info["backend"] = backend.name
    shard_tasks = [t for t in tasks_of(items, args.num_descriptions) if t.index % count == index]
    done = parts.done(retry_failed=args.retry_failed)
    todo = [task for task in shard_tasks if task_key(task) not in done]
    prompts = TaskPrompts(source.processor, args.prompt, args.class_prompt, class_names, args.prompts)
    several = args.num_descriptions > 1
    if args.do_sample and not several:
        torch.manual_seed(args.seed + index)
    what = "images" if not several else f"descriptions ({args.num_descriptions} per image)"
    print(f"shard {index}/{count}: {len(todo)} {what} to describe ({len(shard_tasks) - len(todo)} already done) "
          f"with {info['architecture']} ({info['dtype']}) on {device}", flush=True)
    describe = ShardPass(args=args, backend=backend, processor=source.processor, prompts=prompts, parts=parts,
                         shard=shard, quiet=quiet)
    describe(todo)
    if args.retry_degenerate:
        overrides = RETRY_SETTINGS[args.retry_degenerate]
        retried = degenerate_records(parts.done(), shard_tasks, args.gate)
        print(f"shard {index}/{count}: {len(retried)} flagged descriptions to describe again with {overrides}",
              flush=True)
        describe([task for task in shard_tasks if task_key(task) in retried], overrides,
                 {key: (record, overrides) for key, record in retried.items()})
    return info


def degenerate_records(done: dict, tasks: list[ImageItem], gate: QualityGate) -> dict:
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
