"""One training epoch and one exact evaluation, shared by both recipes.

Losses are accumulated on the device and read back only every ``print_freq`` steps, so the host
never waits on the GPU in between; the per-step values kept since the last read still let a
non-finite loss be reported with its exact step and term.
"""
import contextlib
import time

import torch

from .distributed import broadcast_buffers, is_main_process, logger, reduce_sums
from .losses import alignment_loss
from .resumable import mix_seed, seed_all


class NonFiniteLoss(RuntimeError):
    pass


class DeviceNormalize:
    """uint8 batches (B, C, H, W) from the loader -> float32 in [0, 1], normalised, on their device.

    The same operations as torchvision's ToTensor + Normalize (so the same numbers, bit for bit), done
    once per batch after the host-to-device copy: the loader workers skip the float conversion, and
    collation, pinned memory and the copy move a quarter of the bytes.
    """

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images):
        if self.mean.device != images.device:
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        return images.float().div_(255).sub_(self.mean).div_(self.std)


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


def _max_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return 0.0


def train_one_epoch(model, loader, optimizer, device, epoch, *, criterion, text=None, amp_dtype=None, scaler=None,
                    mix_fn=None, ema=None, clip_grad=None, print_freq=10, num_epochs=None, channels_last=False,
                    prepare=None, start_step=0, partial=None, seed=None, should_stop=None):
    """Train ``model`` for one pass over ``loader``; return metrics averaged over all ranks.

    criterion(images, logits, targets) -> classification loss. ``text``: None (baseline) or a dict
    with loss_type, tau, lamb, gather_with_grad, local_loss; batches then carry a third element,
    the text embeddings. ``prepare`` (e.g. DeviceNormalize) turns the loader's uint8 batches into the model's
    input on the device. ``mix_fn(images, targets, text)`` applies Mixup/CutMix. ``should_stop()``
    is asked after every step; when it says True the epoch ends early and the returned dict has
    ``stopped_at_step`` and ``partial`` (the epoch's sums so far, over all ranks). ``start_step`` and
    ``partial`` continue such an epoch (the loader then starts at that step). ``seed`` seeds each
    step's main-process randomness from (seed, epoch, step). Keys: loss, ce_loss, text_loss, acc1
    (when targets are hard), lr, images_per_s, epoch_time_s, steps.
    """
    model.train()
    steps = start_step + len(loader)
    stats = torch.zeros(5, device=device, dtype=torch.float64)  # loss, ce, text, correct, samples (sums)
    if partial is not None and is_main_process():  # sums of the steps done before a stop, all ranks
        stats += torch.tensor(partial, dtype=torch.float64, device=device)
    window = []  # per-step [loss, ce, text] since the last read-back
    started = time.time()
    data_time = 0.0
    images_seen = 0
    stopped_at = None
    lr = optimizer.param_groups[0]["lr"]
    fetch_start = time.time()
    step = start_step - 1
    for step, batch in enumerate(loader, start=start_step):
        if seed is not None:
            seed_all(mix_seed(seed, epoch, step, 1), device)
        images, targets = batch[0], batch[1]
        text_emb = batch[2] if text is not None else None
        images = to_device(images, device, prepare, channels_last)
        targets = targets.to(device, non_blocking=True)
        if text_emb is not None:
            text_emb = text_emb.to(device, non_blocking=True)
        hard_targets = targets
        if mix_fn is not None:
            images, targets, text_emb = mix_fn(images, targets, text_emb)
        data_time += time.time() - fetch_start

        with autocast(device, amp_dtype):
            output = model(images)
            logits, projected = output if isinstance(output, tuple) and text is not None else (output, None)
            ce = criterion(images, logits, targets)
            if projected is not None:
                text_loss = alignment_loss(projected, text_emb, text["loss_type"], text["tau"],
                                           text["gather_with_grad"], text["local_loss"])
                loss = ce + text["lamb"] * text_loss
            else:
                text_loss = torch.zeros((), device=device)
                loss = ce
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            if clip_grad is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
        if ema is not None:
            ema.update(model)

        n = images.shape[0]
        values = torch.stack([loss.detach().float(), ce.detach().float(), text_loss.detach().float()]).double()
        window.append(values)
        stats[:3] += values * n
        if mix_fn is None and hard_targets.dim() == 1:
            first_logits = logits[0] if isinstance(logits, tuple) else logits
            stats[3] += (first_logits.argmax(dim=1) == hard_targets).sum()
        stats[4] += n
        images_seen += n
        stop = should_stop() if should_stop is not None else False
        if (step + 1) % print_freq == 0 or step + 1 == steps or stop:
            _check_finite(window, epoch, step)
            window = []
            now = time.time()
            rate = images_seen / max(now - started, 1e-9)
            cur = stats.tolist()
            eta = (now - started) / (step + 1 - start_step) * (steps - step - 1)
            total = f"/{num_epochs}" if num_epochs else ""
            logger.info(
                f"epoch {epoch}{total} [{step + 1}/{steps}] loss {cur[0] / cur[4]:.4f} ce {cur[1] / cur[4]:.4f} "
                f"text {cur[2] / cur[4]:.4f} lr {lr:.3e} img/s {rate:.1f} (per rank) data {data_time / (step + 1 - start_step):.3f}s "
                f"eta {_format_eta(eta)} max mem {_max_memory_mib(device):.0f} MiB")
        if stop:
            stopped_at = step + 1
            break
        fetch_start = time.time()
    elapsed = time.time() - started
    keys = ["loss", "ce", "text", "correct", "n"]  # the order of ``stats`` and of ``partial``
    sums = dict(zip(keys, stats.tolist()))
    if stopped_at is not None:
        summed = reduce_sums(sums, device)
        return {"stopped_at_step": stopped_at, "partial": [summed[k] for k in keys], "lr": lr}
    totals = reduce_sums({**sums, "images_per_s": images_seen / max(elapsed, 1e-9)}, device)
    count = max(totals["n"], 1)
    metrics = {"loss": totals["loss"] / count, "ce_loss": totals["ce"] / count, "text_loss": totals["text"] / count,
               "lr": lr, "images_per_s": totals["images_per_s"], "epoch_time_s": elapsed, "steps": step + 1}
    if mix_fn is None:
        metrics["acc1"] = 100.0 * totals["correct"] / count
    return metrics


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
    step left different), so the figures are those of the weights rank 0 saves."""
    broadcast_buffers(model)
    model.eval()
    stats = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top1, top5, n
    for batch in loader:
        images, targets = to_device(batch[0], device, prepare, channels_last), batch[1].to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        stats[0] += torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == targets[:, None]
        stats[1] += hits[:, 0].sum()
        stats[2] += hits.any(dim=1).sum()
        stats[3] += len(targets)
    totals = reduce_sums(dict(zip(["loss", "top1", "top5", "n"], stats.tolist())), device)
    n = max(totals["n"], 1)
    return {"loss": totals["loss"] / n, "acc1": 100.0 * totals["top1"] / n, "acc5": 100.0 * totals["top5"] / n,
            "num_images": int(totals["n"])}
