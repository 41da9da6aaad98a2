"""CLIP's text tower: loading weights offline, tokenising fast, encoding descriptions in a stream."""
import os

import torch
import torch.nn.functional as F

from ._compat import import_clip
from .errors import UserError

CONTEXT_LENGTH = 77
DEFAULT_DOWNLOAD_ROOT = os.path.join("~", ".cache", "clip")


def resolve_clip_weights(model, download_root=None, allow_download=True):
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
    try:
        return _download(url, root)
    except Exception as e:  # no network, proxy, disk full, checksum mismatch
        raise UserError(f"could not get CLIP weights for {model} ({type(e).__name__}: {e}); {how_to}") from None


def load_clip(weights_path, device):
    """Build CLIP from a JIT archive (OpenAI's files) or a plain state dict, on ``device``.

    As in OpenAI's code the weights stay fp16 on CUDA and become fp32 on CPU.
    """
    clip = import_clip()
    try:
        model, _ = clip.load(weights_path, device=device, jit=False)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{weights_path!r} is not a CLIP checkpoint ({type(e).__name__}: {e}); "
                        f"pass a file saved by OpenAI's CLIP or a state dict in its format") from None
    return model.eval()


class Tokenizer:
    """Token ids identical to ``clip.tokenize(texts, truncate=True)``, plus the truncation count.

    One instance per process (each DataLoader worker keeps its own BPE cache warm)."""

    def __init__(self, context_length=CONTEXT_LENGTH):
        import_clip()
        from clip.clip import _tokenizer
        self._tokenizer = _tokenizer
        self.context_length = context_length
        self.sot = _tokenizer.encoder["<|startoftext|>"]
        self.eot = _tokenizer.encoder["<|endoftext|>"]

    def __call__(self, texts):
        """``texts``: list of str -> (LongTensor [len(texts), context_length], number truncated)."""
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        truncated = 0
        for i, text in enumerate(texts):
            ids = [self.sot] + self._tokenizer.encode(text) + [self.eot]
            if len(ids) > self.context_length:
                truncated += 1
                ids = ids[:self.context_length]
                ids[-1] = self.eot
            out[i, :len(ids)] = torch.tensor(ids)
        return out, truncated


class _TokenisedBatches(torch.utils.data.Dataset):
    """Batch ``i`` of the descriptions, tokenised (so DataLoader workers tokenise in parallel)."""

    def __init__(self, texts, batch_size):
        self.texts = texts
        self.batch_size = batch_size
        self.tokenizer = None

    def __len__(self):
        return (len(self.texts) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i):
        if self.tokenizer is None:
            self.tokenizer = Tokenizer()
        start = i * self.batch_size
        tokens, truncated = self.tokenizer(self.texts[start:start + self.batch_size])
        return start, tokens, truncated


@torch.inference_mode()
def encode_descriptions(model, texts, device, batch_size=1024, num_workers=4, out_dtype=torch.float16,
                        progress=True):
    """Encode every text with ``model.encode_text`` into L2-normalised rows.

    Returns ``(embeddings [len(texts), D] in out_dtype on CPU, number of truncated texts)``.
    Rows are streamed into one preallocated tensor, so memory stays flat for any N; tokenisation
    runs in ``num_workers`` processes ahead of the model.
    """
    from tqdm import tqdm
    device = torch.device(device)
    width = model.text_projection.shape[1]
    out = torch.empty(len(texts), width, dtype=out_dtype)
    loader = torch.utils.data.DataLoader(
        _TokenisedBatches(texts, batch_size), batch_size=None, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False)
    truncated = 0
    with tqdm(total=len(texts), unit="desc", unit_scale=True, disable=not progress,
              desc="encoding descriptions", dynamic_ncols=True) as bar:
        for start, tokens, n_trunc in loader:
            features = model.encode_text(tokens.to(device, non_blocking=True))
            features = F.normalize(features.float(), dim=-1)
            out[start:start + len(tokens)].copy_(features.to(out_dtype), non_blocking=False)
            truncated += n_trunc
            bar.update(len(tokens))
    return out, truncated
