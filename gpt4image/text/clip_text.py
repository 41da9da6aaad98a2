"""CLIP's text tower: loading weights offline and tokenising fast."""
import os
import re

import torch

from .._compat import import_clip
from ..errors import UserError

CONTEXT_LENGTH = 77
DEFAULT_DOWNLOAD_ROOT = os.path.join("~", ".cache", "clip")


def resolve_clip_weights(model: str, download_root: str | None = None, allow_download: bool = True) -> str:
    """Path of the weights file for ``model`` (a name from ``clip.available_models()`` or a path).

    A known name is looked up in ``download_root`` (clip's own cache layout); when the file is not
    there it is downloaded (TLS verified) unless ``allow_download`` is False, and any failure says
    exactly which file to put where.
    """
    clip = import_clip()
    from clip.clip import _MODELS, _download
    if os.path.isfile(model):
        return model
    if model not in _MODELS:
        raise UserError(f"unknown CLIP model {model!r}; use one of {', '.join(clip.available_models())} "
                        f"or the path of a checkpoint file")
    root = os.path.expanduser(download_root or DEFAULT_DOWNLOAD_ROOT)
    url = _MODELS[model]
    target = os.path.join(root, os.path.basename(url))
    how_to = (f"download {url} on a machine with internet and put it at {target} "
              f"(or pass --download-root DIR holding {os.path.basename(url)}, or --model /path/to/file)")
    if not allow_download and not os.path.isfile(target):
        raise UserError(f"CLIP weights for {model} are not at {target} and downloading is off; {how_to}")
    if not os.path.isfile(target):  # the one download a tool makes without --allow-download: say so first
        print(f"downloading OpenAI CLIP {model} weights from {url} into {target} (once; --no-download "
              f"forbids it)", flush=True)
    try:
        return _download(url, root)
    except Exception as e:  # no network, proxy, disk full, checksum mismatch
        raise UserError(f"could not get CLIP weights for {model} ({type(e).__name__}: {e}); {how_to}") from None


def load_clip(weights_path: str, device: str | torch.device) -> torch.nn.Module:
    """Build CLIP from a JIT archive (OpenAI's files) or a plain state dict, on ``device``.

    As in OpenAI's code the weights stay fp16 on CUDA and become fp32 on CPU.
    """
    from ..io import load_error
    from ..weights import check_weights
    clip = import_clip()
    check_weights(weights_path, "CLIP weights")
    try:
        model, _ = clip.load(weights_path, device=device, jit=False)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{weights_path!r} is not a CLIP checkpoint ({load_error(e)}); "
                        f"pass a file saved by OpenAI's CLIP or a state dict in its format") from None
    return model.eval()


# ASCII text with none of these is left unchanged by ftfy.fix_text and html.unescape (which only
# act on non-ASCII characters, control characters, escape sequences and "&" entities), so the
# tokeniser can skip them; the carriage return is fine because whitespace is collapsed afterwards.
_NEEDS_FULL_CLEAN = re.compile(r"[^\t\n\r\x20-\x7e]|&")


class Tokenizer:
    """Token ids identical to ``clip.tokenize(texts, truncate=True)``, plus the truncation count.

    OpenAI's cleaning, regex and BPE, with shortcuts that cannot change the ids: plain ASCII text
    skips ftfy (which would leave it as it is); the ids of each space-separated chunk of the
    cleaned text are cached whole (no regex match crosses a space, so a chunk's ids do not depend on
    its neighbours; the released code redoes the regex, byte mapping and vocabulary lookups for
    every occurrence); and chunks after the context is full are not encoded. One instance per
    process (each DataLoader worker keeps its own cache warm).
    """

    def __init__(self, context_length: int = CONTEXT_LENGTH):
        import_clip()
        from clip import simple_tokenizer
        from clip.clip import _tokenizer
        self._tokenizer = _tokenizer
        self._simple = simple_tokenizer
        self.context_length = context_length
        self.sot = _tokenizer.encoder["<|startoftext|>"]
        self.eot = _tokenizer.encoder["<|endoftext|>"]
        self._chunk_ids = {}
        self.max_cached_chunks = 1 << 20  # about 100 MB per process at most

    def clean(self, text: str) -> str:
        """The text OpenAI's tokeniser splits: ftfy-fixed, HTML-unescaped, whitespace collapsed, lower case."""
        if _NEEDS_FULL_CLEAN.search(text) is not None:
            text = self._simple.basic_clean(text)
        return self._simple.whitespace_clean(text).lower()

    def _ids_of_chunk(self, chunk):
        t = self._tokenizer
        ids = []
        for word in t.pat.findall(chunk):
            symbols = "".join(t.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(t.encoder[piece] for piece in t.bpe(symbols).split(" "))
        if len(self._chunk_ids) >= self.max_cached_chunks:
            self._chunk_ids.clear()
        self._chunk_ids[chunk] = ids
        return ids

    def encode(self, text: str, limit: int) -> list[int]:
        """Ids of ``text`` (no start/end token), stopping once more than ``limit`` are known."""
        ids = []
        cache = self._chunk_ids
        for chunk in self.clean(text).split(" "):
            chunk_ids = cache.get(chunk)
            ids.extend(self._ids_of_chunk(chunk) if chunk_ids is None else chunk_ids)
            if len(ids) > limit:
                break
        return ids

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        """``texts``: list of str -> (LongTensor [len(texts), context_length], number truncated)."""
        room = self.context_length - 2
        rows = []
        truncated = 0
        for text in texts:
            ids = self.encode(text, room)
            if len(ids) > room:
                truncated += 1
                ids = ids[:room]
            rows.append([self.sot] + ids + [self.eot] + [0] * (room - len(ids)))
        return torch.tensor(rows, dtype=torch.long), truncated
