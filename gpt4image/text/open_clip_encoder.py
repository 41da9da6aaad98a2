"""The open_clip family of text encoders, ``open_clip:ARCH[:PRETRAINED]``: an open_clip model's text
tower (``ARCH`` a built-in name, a model config ``.json``, ``local-dir:DIR`` or ``hf-hub:ORG/NAME``;
``PRETRAINED`` a tag or a weights file), offline unless asked otherwise."""
import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import UserError
from .encoder import TextEncoder, library_versions


class OpenClipTokenizer:
    """open_clip's own tokenizer for the architecture, with truncation counted."""

    def __init__(self, tokenizer: Any, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length
        hf = getattr(tokenizer, "tokenizer", None)  # HFTokenizer wraps a transformers tokenizer
        specials = hf.num_special_tokens_to_add() if hf is not None else 2
        self.room = context_length - specials
        self.additive = hf is None  # open_clip's own BPE, like OpenAI's, never spans a space

    def count(self, text: str) -> int:
        hf = getattr(self.tokenizer, "tokenizer", None)
        if hf is not None:
            return len(hf(self.tokenizer.clean_fn(text), add_special_tokens=False)["input_ids"])
        return len(self.tokenizer.encode(text))

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        truncated = sum(self.count(t) > self.room for t in texts)
        return self.tokenizer(texts, context_length=self.context_length), truncated


def _parse_open_clip(spec):
    rest = spec[len("open_clip:"):]
    if rest.startswith(("local-dir:", "hf-hub:")):
        return rest, None
    arch, _, pretrained = rest.partition(":")
    if not arch:
        raise UserError(f"--model {spec!r} names no architecture; use open_clip:ARCH[:PRETRAINED], "
                        f"e.g. open_clip:ViT-B-32:laion2b_s34b_b79k or open_clip:ViT-B-32:/path/weights.bin")
    return arch, pretrained or None


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face Hub offline inside the block (only its cache is read, no request is made) and the
    libraries' error logs muted (the caller's refusal says what failed, on one line). huggingface_hub
    reads HF_HUB_OFFLINE once, at import, so its constant is set as well as the variable: with the
    variable alone, a missing tag was refused after about 45 s of retried requests."""
    import logging

    import huggingface_hub.constants as hub
    saved_env, saved_constant = os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub.HF_HUB_OFFLINE = "1", True
    muted = logging.root.manager.disable
    logging.disable(logging.ERROR)  # open_clip logs a missing tag as an error; the refusal names it, on one line
    try:
        yield
    finally:
        logging.disable(muted)
        hub.HF_HUB_OFFLINE = saved_constant
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def open_clip_encoder(spec: str, device: str | torch.device, allow_download: bool = False) -> TextEncoder:
    """The text tower of the open_clip model ``spec`` names (the image tower is dropped); weights
    from a file or Hugging Face's cache, downloaded only with ``allow_download``."""
    from .._compat import ensure_torchvision_importable
    ensure_torchvision_importable()
    try:
        import open_clip
    except ImportError:
        raise UserError("open_clip is not installed; pip install open_clip_torch") from None
    arch, pretrained = _parse_open_clip(spec)
    if arch.endswith(".json"):  # a model config of the user's: register it under its file name
        if not os.path.isfile(arch):
            raise UserError(f"open_clip model config {arch!r} does not exist; pass the path of a model config .json "
                            f"(open_clip's format: embed_dim, vision_cfg, text_cfg) or an architecture name")
        open_clip.add_model_config(arch)
        arch = os.path.splitext(os.path.basename(arch))[0]
    elif not arch.startswith(("local-dir:", "hf-hub:")) and arch not in open_clip.list_models():
        raise UserError(f"unknown open_clip architecture {arch!r} in --model {spec!r}; use one of "
                        f"open_clip.list_models() (e.g. ViT-B-32, ViT-SO400M-14-SigLIP), a model config .json, "
                        f"local-dir:DIR or hf-hub:ORG/NAME")
    if pretrained and not os.path.isfile(pretrained) and os.path.sep in pretrained:
        raise UserError(f"open_clip weights {pretrained!r} do not exist; pass a weights file or a pretrained tag")
    if pretrained and os.path.isfile(pretrained):
        from ..weights import check_weights
        check_weights(pretrained, "open_clip weights")
    try:
        with contextlib.nullcontext() if allow_download else hub_offline():
            model = open_clip.create_model(arch, pretrained=pretrained, device=device)
            tokenizer = open_clip.get_tokenizer(arch)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  missing weights offline, unknown tag, corrupt file
        how = ("" if allow_download else
               "; put the weights file on this machine and pass open_clip:ARCH:/path/to/file, or fill open_clip's "
               "cache (~/.cache/huggingface) on a machine with internet, or pass --allow-download")
        from ..io import load_error
        raise UserError(f"cannot load open_clip model {spec!r} ({load_error(e).splitlines()[0]}){how}") from None
    if not hasattr(model, "encode_text"):
        raise UserError(f"open_clip model {spec!r} has no text tower; pass a CLIP-style model")
    if hasattr(model, "visual"):
        model.visual = torch.nn.Identity()  # the image tower is not needed: free its memory
    model.eval()
    context = getattr(model, "context_length", None) or getattr(tokenizer, "context_length", 77)
    return TextEncoder(family="open_clip", name=spec, tokenizer=OpenClipTokenizer(tokenizer, context),
                       encode=lambda tokens: model.encode_text(tokens.to(device, non_blocking=True)),
                       context_length=context, extra={"versions": library_versions("torch", "open_clip")})
