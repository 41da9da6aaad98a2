"""The OpenAI CLIP family of text encoders: a CLIP name (``RN50``, ``ViT-L/14``, ...) or checkpoint
path, as released, with CLIP's own tokenizer."""
import torch

from .encoder import TextEncoder, library_versions


class OpenAIClipTokenizer:
    """CLIP's 77-token ids (``clip_text.Tokenizer``: identical to ``clip.tokenize(truncate=True)``)."""
    room = 75
    additive = True  # no token spans a space, and cleaning collapses whitespace

    def __init__(self):
        self._tokenizer = None

    def _get(self):
        if self._tokenizer is None:
            from .clip_text import Tokenizer
            self._tokenizer = Tokenizer()
        return self._tokenizer

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._tokenizer = None

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        return self._get()(texts)

    def count(self, text: str) -> int:
        return len(self._get().encode(text, 1 << 30))


def openai_clip(model: str, device: str | torch.device, download_root: str | None = None,
                allow_download: bool = True) -> TextEncoder:
    """OpenAI CLIP's text tower; the weights are downloaded (as released) unless ``allow_download``
    is False."""
    from .clip_text import load_clip, resolve_clip_weights
    weights = resolve_clip_weights(model, download_root, allow_download=allow_download)
    net = load_clip(weights, device)
    return TextEncoder(family="openai_clip", name=model, tokenizer=OpenAIClipTokenizer(),
                       encode=lambda tokens: net.encode_text(tokens.to(device, non_blocking=True)), context_length=77,
                       extra={"weights": weights, "versions": library_versions("torch", "clip")})
