"""Retrieval figures of the projected image features against their descriptions' embeddings."""
import torch


def retrieval_metrics(images: torch.Tensor, texts: torch.Tensor, chunk: int = 4096) -> dict:
    """Image->text and text->image recall@1/@5 (in %) of each image's own description among all, and
    the mean cosine between each image's projected feature and its description's embedding."""
    z = torch.nn.functional.normalize(images, dim=1)
    t = torch.nn.functional.normalize(texts, dim=1)
    k = min(5, len(z))
    found = {}
    for name, queries, keys in (("i2t", z, t), ("t2i", t, z)):
        hits = torch.zeros(2, dtype=torch.float64, device=z.device)
        for start in range(0, len(queries), chunk):
            top = (queries[start:start + chunk] @ keys.t()).topk(k, dim=1).indices
            own = torch.arange(start, start + len(top), device=z.device)[:, None] == top
            hits += torch.stack([own[:, 0].sum(), own.any(dim=1).sum()]).double()
        found[f"{name}_r1"], found[f"{name}_r5"] = (100.0 * hits / len(queries)).tolist()
    found["pair_cosine"] = (z * t).sum(dim=1).mean().item()
    return found
