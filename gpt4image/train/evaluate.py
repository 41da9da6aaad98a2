"""Exact evaluation of both recipes: every validation sample once, over all ranks."""
from collections.abc import Callable

import torch

from .distributed import broadcast_buffers, heartbeat, reduce_sums
from .metrics import retrieval_metrics
from .step import alignment_state, autocast, to_device


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, prepare: Callable | None = None) -> dict:
    """Top-1/top-5 and cross-entropy over exactly the samples of ``loader`` on every rank (use
    ExactDistributedSampler and the model without DDP), reduced by sample count.

    Every rank first takes rank 0's buffers (BatchNorm statistics, which each rank's last training
    step left different), so the figures are those of the weights rank 0 saves. When the batches
    carry text embeddings (``--val-text-emb``) and the model has a projection head, the retrieval
    figures of ``retrieval_metrics`` over the whole validation set are added."""
    broadcast_buffers(model)
    model.eval()
    stats = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top1, top5, n
    pairs = []  # (projected image feature, its description's embedding) per batch
    with_text = getattr(model, "projection_head", None) is not None
    state = alignment_state(model)  # --text-emb-standardize: the head was trained towards standardised rows
    standardize = state.standardized if state is not None and state.standardize else None
    for batch in loader:
        images, targets = to_device(batch[0], device, prepare, channels_last), batch[1].to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            if with_text and len(batch) > 2:
                logits, projected = model.logits_and_projection(images)
                text = batch[2].to(device).float()
                pairs.append((projected.float(), standardize(text, unit=True) if standardize else text))
            else:
                logits = model(images)
        _count(stats, logits.float(), targets)
        heartbeat("an evaluation batch")
    totals = reduce_sums(dict(zip(["loss", "top1", "top5", "n"], stats.tolist())), device)
    n = max(totals["n"], 1)
    metrics = {"loss": totals["loss"] / n, "acc1": 100.0 * totals["top1"] / n, "acc5": 100.0 * totals["top5"] / n,
               "num_images": int(totals["n"])}
    if pairs:
        images = gather_rows(torch.cat([p[0] for p in pairs]))
        texts = gather_rows(torch.cat([p[1] for p in pairs]))
        metrics.update(retrieval_metrics(images, texts))
    return metrics


def _count(stats, logits, targets):
    """Adds a batch's summed cross-entropy, top-1 and top-5 hits and size to ``stats``."""
    stats[0] += torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    # 2-d targets are label sets (ReaL, eval_sets.LabelSets): right when the prediction is any of them
    hits = targets.gather(1, top) > 0 if targets.dim() == 2 else top == targets[:, None]
    stats[1] += hits[:, 0].sum()
    stats[2] += hits.any(dim=1).sum()
    stats[3] += len(targets)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows of ``x`` (their counts may differ by one), in rank order."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([len(x)], device=x.device))
    longest = max(int(c) for c in counts)
    padded = torch.zeros(longest, *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(c)] for p, c in zip(parts, counts)])
