"""The transformers backend: ``model.generate`` on preprocessed batches (static batching)."""
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .listing import ImageItem

Result = tuple[ImageItem, str | None, str | None, bool]  # (item, description, reason it failed, hit the token limit)


@torch.inference_mode()
def generate(model: torch.nn.Module, processor: Any, inputs: Any, device: str | torch.device,
             generation: dict[str, Any], with_limit: bool = False) -> list[str] | tuple[list[str], list[bool]]:
    """Descriptions for one preprocessed batch: ``model.generate`` with the settings in
    ``generation`` (a dict of generate's keyword arguments), without the prompt. ``with_limit``:
    also return, per description, whether it stopped at ``max_new_tokens`` (no end token)."""
    inputs = inputs.to(device)
    floating = next(model.parameters()).dtype
    for key, value in inputs.items():
        if torch.is_floating_point(value):
            inputs[key] = value.to(floating)
    out = model.generate(**inputs, **generation)
    prompt = inputs["input_ids"]
    if out.shape[1] >= prompt.shape[1] and torch.equal(out[:, :prompt.shape[1]], prompt):
        out = out[:, prompt.shape[1]:]  # decoder-only models return the prompt before the new tokens
    texts = [text.strip() for text in processor.tokenizer.batch_decode(out, skip_special_tokens=True)]
    if not with_limit:
        return texts
    eos = model.generation_config.eos_token_id
    eos = [e for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    ended = torch.isin(out, torch.tensor(eos, device=out.device)).any(dim=1)
    return texts, [bool(out.shape[1] >= generation["max_new_tokens"] and not e) for e in ended.tolist()]


def batch_results(loader: Iterable, describe: Callable[[list[ImageItem], Any], tuple[list[str], list[bool]]]
                  ) -> Iterator[list[Result]]:
    """transformers: one list of ``(item, description or None, reason or None, stopped at the token
    limit)`` per batch; ``describe(items, inputs) -> (descriptions, stopped at the limit)``."""
    for good, inputs, failures in loader:
        results = [(item, None, reason, False) for item, reason in failures]
        if good:
            texts, at_limit = describe(good, inputs)
            results += [(item, text, None, cut) for item, text, cut in zip(good, texts, at_limit)]
        yield results
