"""What generate_descriptions records of a run: the settings that decide the text of a description
(parts made with other settings are not mixed in), those a --merge command states, and the metadata
written beside the final file."""
import argparse
import datetime
import json
import os
import sys
from typing import Any

import torch

from .. import __version__
from ..io import sha256_file
from .models import inspect_vlm
from .parts import Parts
from .quality import QualityGate


def generation_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``generate``'s keyword arguments for the command line (and the seed of a sampled run)."""
    generation = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "num_beams": 1}
    if args.do_sample:
        generation.update(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    return generation


def run_settings(args: argparse.Namespace, model_info: dict[str, Any]) -> dict[str, Any]:
    """What decides the text of a description: parts made with other settings are not mixed in."""
    return {"model": model_info["name"], "model_config_sha256": model_info["config_sha256"], "backend": args.backend,
            "dtype": model_info["dtype"], "prompt": args.prompt, "class_prompt": args.class_prompt,
            "class_names_sha256": sha256_file(args.class_names) if args.class_names else None,
            "generation": generation_settings(args), "data": os.path.abspath(args.data),
            **{k: v for k, v in preprocessing(args).items() if v is not None},
            **({"quality_gate": args.gate.settings()} if args.gate != QualityGate() else {})}


def preprocessing(args: argparse.Namespace) -> dict[str, Any]:
    """Settings beyond the original ones that change the text (each None when not used, so that
    parts made before they existed still match a run without them)."""
    return {"max_pixels": args.max_pixels, "min_pixels": args.min_pixels, "loader_max_pixels": args.loader_max_pixels,
            "num_descriptions": args.num_descriptions if args.num_descriptions > 1 else None,
            "prompts": args.prompts}


def merge_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a --merge command states of the descriptions (the same command as the shards', plus
    --merge): the parts must have been made with it. The model is compared when --model is given."""
    stated = {k: v for k, v in run_settings(args, {"name": None, "config_sha256": None, "dtype": None}).items()
              if k in ("prompt", "class_prompt", "class_names_sha256", "generation", "quality_gate")}
    stated.setdefault("quality_gate", None)
    stated.update(preprocessing(args))  # None where not used: parts made with a value are refused
    if args.model:
        stated["model_config_sha256"] = inspect_vlm(args.model, args.allow_download).info["config_sha256"]
    return stated


def written_gate(parts: Parts, args: argparse.Namespace) -> QualityGate:
    """The quality gate the part files were written under (their settings), else the command line's."""
    if not os.path.isfile(parts.settings_path):
        return args.gate
    with open(parts.settings_path, encoding="utf-8") as f:
        recorded = json.load(f).get("quality_gate")
    return QualityGate(**recorded) if recorded else QualityGate()


def metadata(args: argparse.Namespace, info: dict[str, Any] | None, started: str) -> dict[str, Any]:
    """The final file's metadata (``<output>.json``), less the counts the merge adds."""
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
