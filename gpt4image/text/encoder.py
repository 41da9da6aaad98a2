"""Every text encoder description2embedding.py knows, behind one interface.

``--model`` picks the family:
- a CLIP name (``RN50``, ``ViT-L/14``, ...) or checkpoint path: OpenAI CLIP, as released;
- ``open_clip:ARCH[:PRETRAINED]``: an open_clip model's text tower (``ARCH`` a built-in name, a model
  config ``.json``, ``local-dir:DIR`` or ``hf-hub:ORG/NAME``; ``PRETRAINED`` a tag or a weights file);
- ``hf:DIR``: a transformers text encoder (CLIP/SigLIP text towers with their projection; any other
  encoder pooled over its tokens, ``--pooling mean|cls``).

An encoder is a ``tokenizer`` (picklable; runs in DataLoader workers: ``tokenizer(texts) ->
(inputs, number truncated)``, ``tokenizer.count(text)`` = content tokens, ``tokenizer.room`` = content
tokens that fit the context) and ``encode(inputs) -> [B, D]`` features (not normalised).
"""
import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UserError

FAMILY_HELP = ("a CLIP name such as RN50 or ViT-L/14, a CLIP checkpoint path, open_clip:ARCH[:PRETRAINED] "
               "or hf:DIR")


@dataclass(kw_only=True)
class TextEncoder:
    """A loaded encoder: ``tokenizer`` and ``encode`` as the module docstring says; ``extra``: what the
    metadata records of it (weights file, library versions)."""
    family: str
    name: str
    tokenizer: Any
    encode: Callable[[Any], torch.Tensor]  # inputs -> [B, D] features
    context_length: int
    pooling: str | None = None
    extra: dict = field(default_factory=dict)


def library_versions(*modules: str) -> dict[str, str | None]:
    """``{module: __version__}`` (None where it cannot be imported), for the metadata."""
    found = {}
    for name in modules:
        try:
            found[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001
            found[name] = None
    return found


def load_text_encoder(model: str, device: str | torch.device, download_root: str | None = None,
                      allow_download: bool = True, allow_hub_download: bool = False,
                      pooling: str = "mean") -> TextEncoder:
    """The encoder ``model`` names (see the module docstring); unknown forms are a UserError.

    OpenAI CLIP weights are downloaded unless ``allow_download`` is False (as released); open_clip
    weights come from a file or the Hugging Face cache, downloaded only with ``allow_hub_download``.
    """
    if model.startswith("open_clip:"):
        from .open_clip_encoder import open_clip_encoder
        return open_clip_encoder(model, device, allow_download=allow_hub_download)
    if model.startswith("hf:"):
        from .hf_encoder import hf_encoder
        return hf_encoder(model, device, pooling)
    prefix = re.match(r"([A-Za-z_][\w-]*):(?![\\/])", model)
    if prefix and not os.path.exists(model):
        raise UserError(f"unknown encoder family {prefix.group(1)!r} in --model {model!r}; use {FAMILY_HELP}")
    from .openai_clip_encoder import openai_clip
    return openai_clip(model, device, download_root, allow_download)
