"""description2embedding.py against the released approach, end to end, in one run.

    python benchmarks/description2embedding.py [--n 100000] [--encoder rn50|tiny] [--families 5000]

Generates N descriptions of MiniGPT-4 length (60-120 words). The released approach tokenises a
batch of 64 with clip.tokenize, then encodes it, sequentially; ours is description2embedding's
encode_descriptions (tokeniser workers ahead of the model, inference mode, fp16 on GPU, rows
streamed into one preallocated table). ``--encoder rn50`` builds CLIP RN50's text tower with random
weights (the same cost as the real one, no download); ``tiny`` isolates the tokenisation and
pipeline cost. Also reports tokenisation alone: one process vs the worker pool, and (``--families
N``, 0 to skip) descriptions/s of each encoder family (OpenAI CLIP, open_clip, transformers CLIP
text and BERT; tiny random models, so the figures are the tokeniser's and the pipeline's) with
``--long-text truncate`` and ``chunks`` on the first N descriptions.
"""
import argparse
import os
import random
import time

import torch
import torch.nn.functional as F

from common import RESULTS, print_table, write_json
from gpt4image._compat import import_clip
from gpt4image.text.encoder import TextEncoder, load_text_encoder
from gpt4image.text.encoding import DescriptionBatches, encode_texts
from gpt4image.text.openai_clip_encoder import OpenAIClipTokenizer

def _vocabulary():
    """Whole English words from CLIP's BPE vocabulary, most frequent first (merge order)."""
    import_clip()
    from clip.clip import _tokenizer
    words = [w[:-4] for w in _tokenizer.encoder if w.endswith("</w>") and w[:-4].isalpha() and len(w) > 5]
    return words[:30000]


def descriptions(n, seed=0):
    """N descriptions of 60-120 words, word frequencies Zipf-like over a 30k-word vocabulary, with
    capitals, commas and full stops; their distinct-word count grows with N as real text does."""
    rng = random.Random(seed)
    vocabulary = _vocabulary()
    weights = [1.0 / (rank + 10) for rank in range(len(vocabulary))]
    out = []
    for _ in range(n):
        words = rng.choices(vocabulary, weights, k=rng.randint(60, 120))
        for i in range(0, len(words), 12):
            words[i] = words[i].capitalize()
            if i:
                words[i - 1] += rng.choice(".,")
        out.append(" ".join(words) + ".")
    return out


def encoder(kind, device):
    clip = import_clip()
    from clip.model import CLIP
    torch.manual_seed(0)
    if kind == "rn50":  # RN50's text tower: width 512, 8 heads, 12 layers, 1024-d output
        model = CLIP(1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12)
    else:
        model = CLIP(64, 32, 1, 64, 16, 77, 49408, 64, 1, 1)
    del clip
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.half()
    return model


@torch.inference_mode()
def released(model, texts, device, batch=64):
    clip = import_clip()
    out = []
    for i in range(0, len(texts), batch):
        tokens = clip.tokenize(texts[i:i + batch], truncate=True).to(device)
        features = model.encode_text(tokens)
        out.append(features / features.norm(dim=-1, keepdim=True))
    return torch.cat(out).half().cpu()


def tokenise_rate(texts, workers):
    """Descriptions/s of our tokeniser in ``workers`` processes (0: in this one)."""
    loader = torch.utils.data.DataLoader(DescriptionBatches(texts, 256, OpenAIClipTokenizer()), batch_size=None,
                                         num_workers=workers)
    start = time.perf_counter()
    for _ in loader:
        pass
    return len(texts) / (time.perf_counter() - start)


def released_tokenise_rate(texts):
    clip = import_clip()
    start = time.perf_counter()
    for i in range(0, len(texts), 64):
        clip.tokenize(texts[i:i + 64], truncate=True)
    return len(texts) / (time.perf_counter() - start)


def family_rates(texts, workers, bs, device):
    """Descriptions/s of each encoder family (tiny random models), truncate and chunks."""
    import tempfile
    from gpt4image.synthetic import save_tiny_clip, save_tiny_hf_text_encoder, save_tiny_open_clip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        specs = {"OpenAI CLIP (tiny)": save_tiny_clip(os.path.join(tmp, "clip.pt")),
                 "open_clip (tiny)": save_tiny_open_clip(os.path.join(tmp, "open_clip")),
                 "hf: CLIP text (tiny)": save_tiny_hf_text_encoder("clip", os.path.join(tmp, "hf_clip")),
                 "hf: BERT, mean pooling (tiny)": save_tiny_hf_text_encoder("bert", os.path.join(tmp, "hf_bert"))}
        for name, spec in specs.items():
            encoder = load_text_encoder(spec, device)
            row = {"encoder": name, "context": encoder.context_length}
            for mode in ("truncate", "chunks"):
                start = time.perf_counter()
                _, _, pieces = encode_texts(encoder, texts, batch_size=bs, num_workers=workers,
                                            chunks=mode == "chunks", progress=False)
                row[f"{mode} desc/s"] = len(texts) / (time.perf_counter() - start)
            row["pieces/desc"] = sum(pieces) / len(pieces)
            rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100000)
    p.add_argument("--encoder", choices=["rn50", "tiny"], default="rn50")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--bs", type=int, default=1024)
    p.add_argument("--families", type=int, default=5000, help="descriptions per family comparison (0: skip)")
    p.add_argument("--json", default=os.path.join(RESULTS, "description2embedding.json"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    texts = descriptions(args.n)
    model = encoder(args.encoder, device)
    rows = []
    start = time.perf_counter()
    ref = released(model, texts, device)
    t_released = time.perf_counter() - start
    rows.append({"approach": "released (tokenise 64, then encode)", "descriptions/s": args.n / t_released,
                 "seconds": t_released})
    start = time.perf_counter()
    ours_encoder = TextEncoder(family="openai_clip", name=args.encoder, tokenizer=OpenAIClipTokenizer(),
                               encode=lambda tokens: model.encode_text(tokens.to(device, non_blocking=True)),
                               context_length=77)
    ours, truncated, _ = encode_texts(ours_encoder, texts, batch_size=args.bs, num_workers=args.workers,
                                      progress=False, pin_memory=device.type == "cuda")
    t_ours = time.perf_counter() - start
    rows.append({"approach": f"ours ({args.workers} tokeniser workers, batch {args.bs})",
                 "descriptions/s": args.n / t_ours, "seconds": t_ours})
    agree = F.cosine_similarity(ref.float(), ours.float()).min().item()
    sample = texts[:20000]
    base = released_tokenise_rate(sample)
    tok = [{"tokenisation": "released: clip.tokenize, one process", "descriptions/s": base, "x released": 1.0}]
    for workers in sorted({0, args.workers}):
        rate = tokenise_rate(sample, workers)
        tok.append({"tokenisation": f"ours, {workers} worker processes" if workers else "ours, one process",
                    "descriptions/s": rate, "x released": rate / base})
    print_table(rows, ["approach", "descriptions/s", "seconds"])
    print(f"\nspeed-up: {t_released / t_ours:.2f}x; {truncated} of {args.n} truncated; "
          f"min cosine(ours, released) {agree:.4f}")
    print(f"1.28M descriptions at this rate: {1281167 / (args.n / t_ours) / 60:.1f} min\n")
    print_table(tok, ["tokenisation", "descriptions/s", "x released"])
    families = family_rates(texts[:args.families], args.workers, args.bs, device) if args.families else []
    if families:
        print(f"\nencoder families, {len(texts[:args.families])} descriptions, {args.workers} tokeniser workers:")
        print_table(families, list(families[0]))
    write_json(args.json, {"n": args.n, "encoder": args.encoder, "device": str(device), "rows": rows,
                           "tokenisation": tok, "speedup": t_released / t_ours, "min_cosine": agree,
                           "families": families})


if __name__ == "__main__":
    main()
