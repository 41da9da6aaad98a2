"""What generate_descriptions prints at the end: counts, the quality gate's tally, failures, where
the files are, and the next command (description2embedding), runnable as printed."""
import argparse
import os

from ..text.clip_text import DEFAULT_DOWNLOAD_ROOT
from ..tiny_models import TINY_MARKER
from .quality import Tally


def report(args: argparse.Namespace, counts: dict[str, int], failures: list[dict], tally: Tally) -> None:
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


def next_step(args: argparse.Namespace) -> tuple[str, str | None]:
    """``(command, note)``: the description2embedding command for these descriptions, runnable as
    printed (with the tiny CLIP stand-in when the model is the tiny VLM written by ``python -m
    gpt4image.tiny_models``), and a note when OpenAI CLIP's RN50 (the default) would be downloaded."""
    import shlex
    command = (f"python description2embedding.py --caption {shlex.quote(args.output)} "
               f"--data {shlex.quote(args.data)}")
    stand_in = os.path.join(os.path.dirname(os.path.abspath(args.model or ".")), "tiny_clip.pt")
    if args.model and os.path.isfile(os.path.join(args.model, TINY_MARKER)) and os.path.isfile(stand_in):
        return f"{command} --model {shlex.quote(stand_in)}", "the tiny CLIP stand-in, as the tiny VLM: no download"
    if not os.path.isfile(os.path.join(os.path.expanduser(DEFAULT_DOWNLOAD_ROOT), "RN50.pt")):
        return command, ("it downloads OpenAI CLIP RN50 (244 MB) the first time; offline, add --model with a CLIP "
                         "weights file, or --no-download to be told where to put it")
    return command, None
