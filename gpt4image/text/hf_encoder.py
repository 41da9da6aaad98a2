"""The transformers family of text encoders, ``hf:DIR``: CLIP and SigLIP text towers with their
projection, or any other text encoder pooled over its tokens (``--pooling mean|cls``), from a local
folder."""
import os
from typing import Any

import torch

from ..errors import UserError
from .encoder import TextEncoder, library_versions

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


HF_PROJECTED = {"clip": "CLIPTextModelWithProjection", "clip_text_model": "CLIPTextModelWithProjection",
                "siglip": "SiglipTextModel", "siglip_text_model": "SiglipTextModel"}


class HFTokenizer:
    """A transformers tokenizer: padded batches (to the longest, or to the context for SigLIP,
    whose pooled token is the last position), cut at the context."""

    def __init__(self, tokenizer: Any, context_length: int, pad_to_context: bool):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.pad_to_context = pad_to_context
        self.room = context_length - tokenizer.num_special_tokens_to_add()

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def __call__(self, texts: list[str]) -> tuple[dict[str, torch.Tensor], int]:
        truncated = sum(self.count(t) > self.room for t in texts)
        batch = self.tokenizer(texts, padding="max_length" if self.pad_to_context else "longest", truncation=True,
                               max_length=self.context_length, return_tensors="pt")
        return dict(batch), truncated


def _context_length(tokenizer, config):
    limits = [n for n in (getattr(tokenizer, "model_max_length", None),
                          getattr(config, "max_position_embeddings", None)) if n and n < 100_000]
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limits = [n - 2 if n == config.max_position_embeddings else n for n in limits]  # padding offset
    return min(limits) if limits else 512


def _config_and_tokenizer(spec, directory):
    """The config and tokenizer of the folder ``hf:DIR``, checked: a missing folder, an unreadable
    config, a model without a text tower and a missing or broken tokenizer are UserErrors."""
    import transformers
    if not os.path.isdir(directory):
        raise UserError(f"--model {spec!r}: {directory!r} is not a directory; pass hf:DIR with the folder of "
                        f"a downloaded text encoder (e.g. `hf download sentence-transformers/all-MiniLM-L6-v2 "
                        f"--local-dir DIR` on a machine with internet)")
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--model {spec!r}: no readable config.json in {directory!r} ({type(e).__name__}); "
                        f"pass the folder of a transformers model") from None
    model_type = config.model_type
    if model_type not in HF_PROJECTED and (getattr(config, "vocab_size", None) is None
                                           or hasattr(config, "vision_config") or hasattr(config, "text_config")):
        raise UserError(f"--model {spec!r} is a {model_type!r} model with no text tower this tool can use; pass a "
                        f"CLIP or SigLIP model or a text encoder (BERT, RoBERTa, MPNet, MiniLM, ...)")
    how = "copy the model's tokenizer files (tokenizer.json, or its vocab files) into it"
    if not any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer (its special tokens only) and encode nonsense
        raise UserError(f"--model {spec!r}: {directory!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                        f"{how}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--model {spec!r}: {directory!r} has no usable tokenizer ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); {how}") from None
    return config, tokenizer


def hf_encoder(spec: str, device: str | torch.device, pooling: str = "mean") -> TextEncoder:
    """The transformers text encoder of the folder ``hf:DIR``; a folder without a usable config,
    tokenizer or weights, or a model with no text tower, is a UserError."""
    import transformers
    directory = spec[len("hf:"):]
    config, tokenizer = _config_and_tokenizer(spec, directory)
    model_type = config.model_type
    from ..weights import check_weights, load_failure
    check_weights(directory, "text encoder weights")
    projected = model_type in HF_PROJECTED
    model_class = getattr(transformers, HF_PROJECTED[model_type]) if projected else transformers.AutoModel
    try:
        model = model_class.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # noqa: BLE001  missing or mismatched weights files: the folder's problem
        raise load_failure(e, directory, f"--model {spec!r}") from None
    if projected:
        pooling = "clip_projection" if "clip" in model_type else "siglip_head"
        output = "text_embeds" if "clip" in model_type else "pooler_output"
    else:
        output = None
    model.to(device).eval()
    text_config = config.text_config if hasattr(config, "text_config") and config.text_config else config
    context = _context_length(tokenizer, text_config)

    def encode(inputs):
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        out = model(**inputs)
        if output is not None:
            return getattr(out, output)
        hidden = out.last_hidden_state
        if pooling == "cls":
            return hidden[:, 0]
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)

    tokenizer = HFTokenizer(tokenizer, context, pad_to_context="siglip" in model_type)
    return TextEncoder(family="hf", name=spec, tokenizer=tokenizer, encode=encode, context_length=context,
                       pooling=pooling, extra={"model_type": model_type,
                              "versions": library_versions("torch", "transformers", "tokenizers")})
