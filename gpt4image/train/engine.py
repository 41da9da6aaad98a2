"""One training step, one training epoch and one exact evaluation, shared by both recipes.

Losses are accumulated on the device and read back only every ``print_freq`` steps, so the host
never waits on the GPU in between; the per-step values kept since the last read still let a
non-finite loss be reported with its exact step and term.
"""
import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .distributed import broadcast_buffers, heartbeat, is_main_process, reduce_sums

from ..log import logger
from .alignment import Alignment
from .resumable import CHECKPOINT, STOP, mix_seed, seed_all

SUM_NAMES = ("loss", "ce", "text", "correct", "n")  # an epoch's sums; also the order of a checkpoint's "partial"


class NonFiniteLoss(RuntimeError):
    pass


def to_device(images, device, prepare=None, channels_last=False):
    images = images.to(device, non_blocking=True)
    if prepare is not None:
        images = prepare(images)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def autocast(device, amp_dtype):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _format_eta(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass
class TrainStep:
    """What one optimisation step uses. ``criterion(images, logits, targets)`` is the classification
    loss; ``alignment`` None trains the baseline (batches then have no third element, the text
    embeddings); ``prepare`` (e.g. DeviceNormalize) turns the loader's uint8 batches into the model's
    input on the device; ``mix_fn(images, targets, text)`` applies Mixup/CutMix."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    criterion: Callable
    device: torch.device
    alignment: Optional[Alignment] = None
    amp_dtype: Optional[torch.dtype] = None
    scaler: Optional[torch.amp.GradScaler] = None
    mix_fn: Optional[Callable] = None
    ema: object = None
    clip_grad: Optional[float] = None
    prepare: Optional[Callable] = None
    channels_last: bool = False
    accum_iter: int = 1  # batches whose gradients are summed before each optimizer step
    text_weight: Optional[float] = None  # the alignment's weight in force (train_one_epoch sets it); None: lamb
    accumulated: list = field(default_factory=list)  # the kept batches of an exact accumulation

    @property
    def exact_accumulation(self):
        """A loss with negatives over all N accumulated batches (see accumulation.py)."""
        a = self.alignment
        return self.accum_iter > 1 and a is not None and a.exact_accumulation and a.negatives


def backward_and_step(loss, optimizer, scaler=None, clip_grad=None, parameters=None, update=True):
    """Backward, then (``update``) optional gradient clipping and the optimizer step; through the
    GradScaler when it is enabled. Without ``update`` the gradient accumulates for a later step."""
    scaling = scaler is not None and scaler.is_enabled()
    (scaler.scale(loss) if scaling else loss).backward()
    if not update:
        return
    if clip_grad is not None:
        if scaling:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
    if scaling:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def alignment_state(model):
    """The alignment loss's state (losses.AlignmentState) of ``model``, under torch.compile and DDP; or None."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "alignment_state", None)


def _no_sync(model, accumulating):
    """DDP's no_sync while gradients accumulate (no all-reduce until the batch that steps)."""
    ddp = getattr(model, "_orig_mod", model)  # under torch.compile
    if accumulating and isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        return ddp.no_sync()
    return contextlib.nullcontext()


def train_step(step, batch, first=True, update=True):
    """Forward and backward of ``batch``, and (``update``) the optimizer step: with --accum-iter N a
    step's batch is N batches, ``first`` starting it and ``update`` ending it. Returns (the
    [loss, ce, text] values as a float64 tensor on the device, batch size, correct top-1 predictions
    or None when the targets are mixed)."""
    if step.exact_accumulation:
        from .accumulation import exact_accumulation_step
        return exact_accumulation_step(step, batch, first, update)
    if first:
        step.optimizer.zero_grad(set_to_none=True)
    with _no_sync(step.model, not update):
        values, n, correct = _forward_backward(step, batch, update)
    if update and step.ema is not None:
        step.ema.update(step.model)
    return values, n, correct


def _forward_backward(step, batch, update):
    device = step.device
    images = to_device(batch[0], device, step.prepare, step.channels_last)
    targets = hard_targets = batch[1].to(device, non_blocking=True)
    text = batch[2].to(device, non_blocking=True) if step.alignment is not None else None
    if step.mix_fn is not None:
        images, targets, text = step.mix_fn(images, targets, text)
    with autocast(device, step.amp_dtype):
        output = step.model(images)
        logits, projected = output if isinstance(output, tuple) and step.alignment is not None else (output, None)
        ce = step.criterion(images, logits, targets)
        if projected is not None:
            text_loss = step.alignment.loss(projected, text, hard_targets, alignment_state(step.model))
            loss = ce + (step.alignment.lamb if step.text_weight is None else step.text_weight) * text_loss
        else:
            text_loss, loss = torch.zeros((), device=device), ce
    backward_and_step(loss / step.accum_iter if step.accum_iter > 1 else loss, step.optimizer, step.scaler,
                      step.clip_grad, step.model.parameters(), update)
    correct = None
    if step.mix_fn is None and hard_targets.dim() == 1:
        first_logits = logits[0] if isinstance(logits, tuple) else logits
        correct = (first_logits.argmax(dim=1) == hard_targets).sum()
    values = torch.stack([loss.detach().float(), ce.detach().float(), text_loss.detach().float()]).double()
    return values, images.shape[0], correct


class EpochSums:
    """Sample-weighted sums of an epoch (SUM_NAMES), kept on the device. ``partial``: the sums over all
    ranks of the steps done before a mid-epoch checkpoint (counted once, on rank 0)."""

    def __init__(self, device, partial=None):
        self.values = torch.zeros(len(SUM_NAMES), device=device, dtype=torch.float64)
        if partial is not None and is_main_process():
            self.values += torch.tensor(partial, dtype=torch.float64, device=device)

    def add(self, losses, n, correct):
        self.values[:3] += losses * n
        if correct is not None:
            self.values[3] += correct
        self.values[4] += n

    def local(self):
        return dict(zip(SUM_NAMES, self.values.tolist()))

    def over_all_ranks(self, **extra):
        return reduce_sums({**self.local(), **extra}, self.values.device)


@dataclass
class Reporting:
    """How training reports: a log line every ``print_freq`` steps, and the same figures (losses over
    the steps since the last line, lr, images/s) to ``sink(global_step, scalars)`` (TensorBoard, W&B)."""
    print_freq: int = 10
    num_epochs: Optional[int] = None
    sink: Optional[Callable] = None


class ProgressLine:
    """The training log line every ``print_freq`` steps; checks the losses since the last one."""

    def __init__(self, epoch, steps, start_step, reporting, device):
        self.epoch, self.steps, self.start_step = epoch, steps, start_step
        self.print_freq, self.sink = reporting.print_freq, reporting.sink
        self.total = f"/{reporting.num_epochs}" if reporting.num_epochs else ""
        self.device = device
        self.started = time.time()
        self.data_time = 0.0
        self.images = 0
        self.window = []  # per-step [loss, ce, text] since the last read-back
        self.text_weight = None  # the alignment's weight in force

    def due(self, step, force=False):
        return force or (step + 1) % self.print_freq == 0 or step + 1 == self.steps

    def log(self, step, sums, lr):
        _check_finite(self.window, self.epoch, step)
        recent = torch.stack(self.window).mean(dim=0).tolist() if self.window else [float("nan")] * 3
        self.window = []
        now = time.time()
        rate = self.images / max(now - self.started, 1e-9)
        if self.sink is not None:
            scalars = dict(zip(("loss", "ce_loss", "text_loss"), recent), lr=lr, images_per_s=rate)
            if self.text_weight is not None:
                scalars["text_weight"] = self.text_weight
            self.sink(self.epoch * self.steps + step + 1, {f"step/{k}": v for k, v in scalars.items()})
        done = step + 1 - self.start_step
        cur = sums.local()
        n = max(cur["n"], 1)
        eta = (now - self.started) / done * (self.steps - step - 1)
        memory = f" max mem {torch.cuda.max_memory_allocated(self.device) / 2 ** 20:.0f} MiB" \
            if self.device.type == "cuda" else ""
        logger.info(
            f"epoch {self.epoch}{self.total} [{step + 1}/{self.steps}] loss {cur['loss'] / n:.4f} "
            f"ce {cur['ce'] / n:.4f} text {cur['text'] / n:.4f} lr {lr:.3e} "
            f"img/s {rate:.1f} (per rank) "
            f"data {self.data_time / done:.3f}s eta {_format_eta(eta)}{memory}")


def train_one_epoch(step, loader, epoch, *, start_step=0, partial=None, control=None, on_checkpoint=None,
                    seed=None, reporting=None):
    """Train for one pass over ``loader`` (which starts at ``start_step``); return metrics averaged over
    all ranks: loss, ce_loss, text_loss, acc1 (when targets are hard), lr, images_per_s,
    epoch_time_s, steps.

    ``control()`` is asked after every step (a ``RunControl``): on CHECKPOINT,
    ``on_checkpoint(step_in_epoch, partial)`` saves the position; on STOP the epoch ends early and
    the returned dict has ``stopped_at_step`` and ``partial`` (the epoch's sums so far, over all
    ranks), which ``start_step`` and ``partial`` continue exactly. ``seed`` seeds each step's
    main-process randomness from (seed, epoch, step). ``reporting``: a ``Reporting``.
    """
    step.model.train()
    steps = start_step + len(loader)
    sums = EpochSums(step.device, partial)
    progress = ProgressLine(epoch, steps, start_step, reporting or Reporting(), step.device)
    lr = step.optimizer.param_groups[0]["lr"]
    index = start_step - 1
    fetch_start = time.time()
    for index, batch in enumerate(loader, start=start_step):
        if seed is not None:
            seed_all(mix_seed(seed, epoch, index, 1), step.device)
        progress.data_time += time.time() - fetch_start
        update = (index + 1) % step.accum_iter == 0 or index + 1 == steps
        if step.alignment is not None:  # a pure function of the position: the same after a resume
            step.text_weight = progress.text_weight = step.alignment.weight(epoch, index - index % step.accum_iter,
                                                                            steps)
        losses, n, correct = train_step(step, batch, first=index % step.accum_iter == 0, update=update)
        if n:  # an exact accumulation reports its batches together, at the optimizer step
            progress.window.append(losses)
            progress.images += n
            sums.add(losses, n, correct)
        heartbeat(f"training epoch {epoch}, step {index + 1}")
        action = control() if control is not None and update else None  # positions only between steps
        if progress.due(index, force=action is not None and action >= CHECKPOINT):
            progress.log(index, sums, lr)
        if action == STOP:
            return {"stopped_at_step": index + 1, "partial": _partial(sums), "lr": lr}
        if action == CHECKPOINT and on_checkpoint is not None:
            on_checkpoint(index + 1, _partial(sums))
        fetch_start = time.time()
    elapsed = time.time() - progress.started
    totals = sums.over_all_ranks(images_per_s=progress.images / max(elapsed, 1e-9))
    count = max(totals["n"], 1)
    metrics = {"loss": totals["loss"] / count, "ce_loss": totals["ce"] / count, "text_loss": totals["text"] / count,
               "lr": lr, "images_per_s": totals["images_per_s"], "epoch_time_s": elapsed, "steps": index + 1}
    if step.mix_fn is None:
        metrics["acc1"] = 100.0 * totals["correct"] / count
    if step.text_weight is not None:
        metrics["text_weight"] = step.text_weight  # of the epoch's last step
    return metrics


def _partial(sums):
    totals = sums.over_all_ranks()
    return [totals[k] for k in SUM_NAMES]


def _check_finite(window, epoch, step):
    if not window:
        return
    values = torch.stack(window).cpu()
    bad = ~torch.isfinite(values)
    if bad.any():
        row, col = bad.nonzero()[0].tolist()
        term = ["total", "classification", "text alignment"][col]
        first_step = step - len(window) + 1 + row
        raise NonFiniteLoss(f"non-finite {term} loss ({values[row, col].item()}) at epoch {epoch}, step {first_step}; "
                            f"the run stops here and the last checkpoint is kept as it was")


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype=None, channels_last=False, prepare=None):
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
        logits = logits.float()
        stats[0] += torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        # 2-d targets are label sets (ReaL, eval_sets.LabelSets): right when the prediction is any of them
        hits = targets.gather(1, top) > 0 if targets.dim() == 2 else top == targets[:, None]
        stats[1] += hits[:, 0].sum()
        stats[2] += hits.any(dim=1).sum()
        stats[3] += len(targets)
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


def gather_rows(x):
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


def retrieval_metrics(images, texts, chunk=4096):
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
