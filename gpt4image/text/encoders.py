"""Every text encoder description2embedding.py knows, behind one interface, and long descriptions.

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
import os
import re
from dataclasses import dataclass, field

import torch

from ..errors import UserError

FAMILY_HELP = ("a CLIP name such as RN50 or ViT-L/14, a CLIP checkpoint path, open_clip:ARCH[:PRETRAINED] "
               "or hf:DIR")


@dataclass
class TextEncoder:
    family: str
    name: str
    tokenizer: object
    encode: object  # inputs -> [B, D] features
    context_length: int
    pooling: str = None
    extra: dict = field(default_factory=dict)


def _versions(*modules):
    import importlib
    found = {}
    for name in modules:
        try:
            found[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001
            found[name] = None
    return found


# ---------------------------------------------------------------------------------------- OpenAI CLIP

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

    def __call__(self, texts):
        return self._get()(texts)

    def count(self, text):
        return len(self._get().encode(text, 1 << 30))


def openai_clip(model, device, download_root=None, allow_download=True):
    from .clip_text import load_clip, resolve_clip_weights
    weights = resolve_clip_weights(model, download_root, allow_download=allow_download)
    net = load_clip(weights, device)
    return TextEncoder("openai_clip", model, OpenAIClipTokenizer(),
                       lambda tokens: net.encode_text(tokens.to(device, non_blocking=True)), 77,
                       extra={"weights": weights, "versions": _versions("torch", "clip")})


# ---------------------------------------------------------------------------------------- open_clip

class OpenClipTokenizer:
    """open_clip's own tokenizer for the architecture, with truncation counted."""

    def __init__(self, tokenizer, context_length):
        self.tokenizer = tokenizer
        self.context_length = context_length
        hf = getattr(tokenizer, "tokenizer", None)  # HFTokenizer wraps a transformers tokenizer
        specials = hf.num_special_tokens_to_add() if hf is not None else 2
        self.room = context_length - specials
        self.additive = hf is None  # open_clip's own BPE, like OpenAI's, never spans a space

    def count(self, text):
        hf = getattr(self.tokenizer, "tokenizer", None)
        if hf is not None:
            return len(hf(self.tokenizer.clean_fn(text), add_special_tokens=False)["input_ids"])
        return len(self.tokenizer.encode(text))

    def __call__(self, texts):
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


def open_clip_encoder(spec, device, allow_download=False):
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
    offline = {} if allow_download else {"HF_HUB_OFFLINE": "1"}
    saved = {k: os.environ.get(k) for k in offline}
    os.environ.update(offline)
    try:
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
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if not hasattr(model, "encode_text"):
        raise UserError(f"open_clip model {spec!r} has no text tower; pass a CLIP-style model")
    if hasattr(model, "visual"):
        model.visual = torch.nn.Identity()  # the image tower is not needed: free its memory
    model.eval()
    context = getattr(model, "context_length", None) or getattr(tokenizer, "context_length", 77)
    return TextEncoder("open_clip", spec, OpenClipTokenizer(tokenizer, context),
                       lambda tokens: model.encode_text(tokens.to(device, non_blocking=True)), context,
                       extra={"versions": _versions("torch", "open_clip")})


# ---------------------------------------------------------------------------------------- transformers

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
HF_PROJECTED = {"clip": "CLIPTextModelWithProjection", "clip_text_model": "CLIPTextModelWithProjection",
                "siglip": "SiglipTextModel", "siglip_text_model": "SiglipTextModel"}


class HFTokenizer:
    """A transformers tokenizer: padded batches (to the longest, or to the context for SigLIP,
    whose pooled token is the last position), cut at the context."""

    def __init__(self, tokenizer, context_length, pad_to_context):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.pad_to_context = pad_to_context
        self.room = context_length - tokenizer.num_special_tokens_to_add()

    def count(self, text):
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def __call__(self, texts):
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


def hf_encoder(spec, device, pooling="mean"):
    import transformers
    directory = spec[len("hf:"):]
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
    from ..weights import check_weights, load_failure
    check_weights(directory, "text encoder weights")
    model_class = getattr(transformers, HF_PROJECTED[model_type]) if model_type in HF_PROJECTED else transformers.AutoModel
    try:
        model = model_class.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # noqa: BLE001  missing or mismatched weights files: the folder's problem
        raise load_failure(e, directory, f"--model {spec!r}") from None
    if model_type in HF_PROJECTED:
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

    return TextEncoder("hf", spec, HFTokenizer(tokenizer, context, pad_to_context="siglip" in model_type),
                       encode, context, pooling,
                       extra={"model_type": model_type, "versions": _versions("torch", "transformers", "tokenizers")})


def load_text_encoder(model, device, download_root=None, allow_download=True, allow_hub_download=False,
                      pooling="mean"):
    """The encoder ``model`` names (see the module docstring); unknown forms are a UserError.

    OpenAI CLIP weights are downloaded unless ``allow_download`` is False (as released); open_clip
    weights come from a file or the Hugging Face cache, downloaded only with ``allow_hub_download``.
    """
    if model.startswith("open_clip:"):
        return open_clip_encoder(model, device, allow_download=allow_hub_download)
    if model.startswith("hf:"):
        return hf_encoder(model, device, pooling)
    prefix = re.match(r"([A-Za-z_][\w-]*):(?![\\/])", model)
    if prefix and not os.path.exists(model):
        raise UserError(f"unknown encoder family {prefix.group(1)!r} in --model {model!r}; use {FAMILY_HELP}")
    return openai_clip(model, device, download_root, allow_download)


# ---------------------------------------------------------------------------------------- long text

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _pack(units, count, room, additive=False):
    """Join consecutive ``units`` (each fits ``room`` alone) with spaces into as few pieces of at
    most ``room`` tokens as a greedy pass finds. Token counts add up across a space for CLIP's BPE
    (``additive``: no token spans a space) and nearly so for other tokenisers, whose joins the
    exact count decides."""
    pieces, current, current_n = [], "", 0
    for unit in units:
        n = count(unit)
        if current and current_n + n <= room + (0 if additive else 1):
            joined = f"{current} {unit}"
            exact = current_n + n if additive else count(joined)
            if exact <= room:
                current, current_n = joined, exact
                continue
        if current:
            pieces.append(current)
        current, current_n = unit, n
    if current:
        pieces.append(current)
    return pieces


# Tokenisers (CLIP's BPE among them) take time quadratic in the length of one word, so a
# 100,000-character "word" would never be counted whole: a text or sentence holding a word longer
# than LONGEST_COUNTED_WORD characters is not counted whole, and a word that does not fit is cut into
# runs of LONGEST_WORD characters before it is cut between characters. No word of a description is
# that long; the work stays linear in the length of the text.
LONGEST_COUNTED_WORD = 256
LONGEST_WORD = 64
_HUGE_WORD = re.compile(r"\S{%d,}" % (LONGEST_COUNTED_WORD + 1))


def _fits(text, count, room):
    return _HUGE_WORD.search(text) is None and count(text) <= room


def _cut_word(word, count, room):
    """A word that does not fit ``room`` (or is too long to count) as pieces that do."""
    pieces = []
    for i in range(0, len(word), LONGEST_WORD):
        run = word[i:i + LONGEST_WORD]
        pieces.extend(_split_long_word(run, count, room) if count(run) > room else [run])
    return pieces


def _split_long_word(word, count, room):
    """A word (of at most ``LONGEST_WORD`` characters) with more tokens than ``room``, cut between
    characters into the longest prefixes that fit (at least one character each)."""
    pieces = []
    while word:
        lo, hi = 1, len(word)  # word[:lo] is taken; the longest fitting prefix is in [lo, hi]
        while lo < hi:
            middle = (lo + hi + 1) // 2
            if count(word[:middle]) <= room:
                lo = middle
            else:
                hi = middle - 1
        pieces.append(word[:lo])
        word = word[lo:]
    return pieces


def _fitting(units, split, count, room):
    """``units`` with each one longer than ``room`` replaced by ``split(unit)``."""
    out = []
    for unit in units:
        out.extend([unit] if _fits(unit, count, room) else split(unit))
    return out


def split_description(text, count, room, additive=False):
    """Pieces of ``text`` that fit ``room`` content tokens: whole sentences packed greedily, a longer
    sentence split at word boundaries (a longer word between characters). A text that fits is
    returned as it is (one piece). ``additive``: see ``_pack``. Linear in the length of ``text``:
    nothing longer than a sentence of ordinary words, or than a piece, is counted."""
    if _fits(text, count, room):
        return [text]
    known = {}

    def count(piece, count=count):  # each sentence and word is counted once
        if piece not in known:
            known[piece] = count(piece)
        return known[piece]

    pieces, run = [], []  # run: consecutive sentences that fit on their own, packed together
    for sentence in filter(None, _SENTENCE_END.split(text.strip())):
        if _fits(sentence, count, room):
            run.append(sentence)
            continue
        pieces += _pack(run, count, room, additive)
        run = []
        words = _fitting(sentence.split(), lambda w: _cut_word(w, count, room), count, room)
        pieces += _pack(words, count, room, additive)
    return pieces + _pack(run, count, room, additive)


# ---------------------------------------------------------------------------------------- encoding

class DescriptionBatches(torch.utils.data.Dataset):
    """Item i: descriptions ``[i * batch_size, (i + 1) * batch_size)`` tokenised, so DataLoader
    workers tokenise ahead of the model. With ``chunks`` each description becomes the pieces of
    ``split_description``, all pieces of the batch tokenised together.

    Returns ``(start, inputs, owner, weights, truncated, pieces)``: ``owner[j]`` is the description
    (within the batch) of piece j, ``weights[j]`` its content-token count; None for both without chunks.
    """

    def __init__(self, texts, batch_size, tokenizer, chunks=False):
        self.texts = texts
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.chunks = chunks

    def __len__(self):
        return (len(self.texts) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i):
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


def combine_pieces(features, owner, weights, rows):
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
def encode_texts(encoder, texts, batch_size=1024, num_workers=4, out_dtype=torch.float16, chunks=False,
                 progress=True, pin_memory=False):
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
