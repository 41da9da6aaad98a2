"""Encoding every description into one L2-normalised row: tokenised in DataLoader workers ahead of
the model, long descriptions in pieces (``long_text``) averaged by token count, rows streamed into
one preallocated table."""
from typing import Any

import torch

from ..errors import UserError
from .encoder import TextEncoder
from .long_text import split_description


class DescriptionBatches(torch.utils.data.Dataset):
    """Item i: descriptions ``[i * batch_size, (i + 1) * batch_size)`` tokenised, so DataLoader
    workers tokenise ahead of the model. With ``chunks`` each description becomes the pieces of
    ``split_description``, all pieces of the batch tokenised together.

    Returns ``(start, inputs, owner, weights, truncated, pieces)``: ``owner[j]`` is the description
    (within the batch) of piece j, ``weights[j]`` its content-token count; None for both without chunks.
    """

    def __init__(self, texts: list[str], batch_size: int, tokenizer: Any, chunks: bool = False):
        self.texts = texts
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.chunks = chunks

    def __len__(self):
        return (len(self.texts) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i: int) -> tuple:
        start = i * self.batch_size
        texts = self.texts[start:start + self.batch_size]
        if not self.chunks:
            inputs, truncated = self.tokenizer(texts)
            return start, inputs, None, None, truncated, [1] * len(texts)
        pieces, owner, weights, counts = [], [], [], []
        for j, text in enumerate(texts):
            parts = split_description(text, self.tokenizer.count, self.tokenizer.room,
                                      getattr(self.tokenizer, "additive", False))
            pieces += parts
            owner += [j] * len(parts)
            weights += [max(1, min(self.tokenizer.count(p), self.tokenizer.room)) for p in parts]
            counts.append(len(parts))
        inputs, truncated = self.tokenizer(pieces)
        return start, inputs, torch.tensor(owner), torch.tensor(weights, dtype=torch.float32), truncated, counts


def combine_pieces(features: torch.Tensor, owner: torch.Tensor, weights: torch.Tensor, rows: int) -> torch.Tensor:
    """Rows of ``rows`` descriptions from their pieces' features: the unit features averaged with
    the pieces' token counts as weights, renormalised. A description of one piece keeps its unit
    feature exactly (the row ``truncate`` gives)."""
    import torch.nn.functional as F
    unit = F.normalize(features.float(), dim=-1)
    summed = torch.zeros(rows, unit.shape[1], dtype=unit.dtype, device=unit.device)
    summed.index_add_(0, owner.to(unit.device), unit * weights.to(unit.device)[:, None])
    out = F.normalize(summed, dim=-1)
    pieces = torch.bincount(owner, minlength=rows)
    single = (pieces == 1).nonzero().squeeze(1)
    if len(single):
        first = torch.searchsorted(owner, single)  # owner is sorted: a description's pieces are adjacent
        out[single.to(out.device)] = unit[first.to(unit.device)]
    return out


def _encode(encoder, inputs):
    """``encoder.encode(inputs)``; a token id beyond the model's embedding table (a checkpoint whose
    vocabulary is smaller than its tokenizer's) is a UserError, not an IndexError deep in torch."""
    try:
        return encoder.encode(inputs)
    except (IndexError, RuntimeError) as e:
        if "index out of range" not in str(e) and "out of bounds" not in str(e):
            raise
        raise UserError(f"--model {encoder.name!r}: its tokenizer gives token ids beyond the model's vocabulary "
                        f"({' '.join(str(e).split())[:120]}); the weights and the tokenizer belong to different "
                        f"models: pass a complete model") from None


@torch.inference_mode()
def encode_texts(encoder: TextEncoder, texts: list[str], batch_size: int = 1024, num_workers: int = 4,
                 out_dtype: torch.dtype = torch.float16, chunks: bool = False, progress: bool = True,
                 pin_memory: bool = False) -> tuple[torch.Tensor, int, list[int]]:
    """Every text through ``encoder`` into one L2-normalised row.

    Returns ``(embeddings [len(texts), D] in out_dtype on CPU, number of truncated texts, pieces per
    text)``. Rows are streamed into one preallocated tensor (memory stays flat for any N);
    tokenisation runs in ``num_workers`` processes ahead of the model.
    """
    import torch.nn.functional as F
    from tqdm import tqdm
    probe, _ = encoder.tokenizer(["a"])
    width = _encode(encoder, probe).shape[1]
    out = torch.empty(len(texts), width, dtype=out_dtype)
    loader = torch.utils.data.DataLoader(
        DescriptionBatches(texts, batch_size, encoder.tokenizer, chunks), batch_size=None, shuffle=False,
        num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=4 if num_workers > 0 else None)
    truncated, pieces = 0, []
    with tqdm(total=len(texts), unit="desc", unit_scale=True, disable=not progress,
              desc="encoding descriptions", dynamic_ncols=True) as bar:
        for start, inputs, owner, weights, n_truncated, counts in loader:
            features = _encode(encoder, inputs)
            if owner is None:
                rows = F.normalize(features.float(), dim=-1)
            else:
                rows = combine_pieces(features, owner, weights, len(counts))
            out[start:start + len(counts)].copy_(rows.to(out_dtype), non_blocking=False)
            truncated += n_truncated
            pieces += counts
            bar.update(len(counts))
    return out, truncated, pieces
