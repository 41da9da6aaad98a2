"""What both training recipes do around the epoch loop: datasets, text embeddings, output files,
resume, and the run's record (args.json, log.txt, TensorBoard, the final line)."""
import json
import os

import torch

from .checkpoint import check_compatible, load_checkpoint, save_checkpoint
from .distributed import logger
from .errors import UserError
from .io import atomic_write_json, ensure_writable_dir
from .losses import describe_alignment
from .resumable import PREEMPTED_EXIT_CODE, ResumableSampler, SeededSamples, ignore_stop_signals
from .samplers import ExactDistributedSampler
from .text_embeddings import SyntheticTextEmbeddings, WithTextEmbeddings, load_text_embeddings

CHECKPOINT = "checkpoint.pth"


def build_train_loader(dataset, sampler, batch_size, num_workers, pin_memory, seed):
    """Loader whose order and augmentation are reproducible and resumable inside an epoch.

    Returns (loader, resumable sampler): call ``sampler.set_epoch(epoch, start_position)``."""
    resumable = ResumableSampler(sampler)
    loader = torch.utils.data.DataLoader(SeededSamples(dataset, seed), batch_size=batch_size, sampler=resumable,
                                         num_workers=num_workers, pin_memory=pin_memory, drop_last=True,
                                         persistent_workers=num_workers > 0, worker_init_fn=ignore_stop_signals)
    return loader, resumable


def build_eval_loader(dataset, dist_info, batch_size, num_workers, pin_memory):
    """Loader visiting each validation sample exactly once over all ranks (evaluate without DDP)."""
    sampler = ExactDistributedSampler(dataset, dist_info.rank, dist_info.world_size)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       pin_memory=pin_memory, worker_init_fn=ignore_stop_signals)


def resume_position(checkpoint):
    """(epoch to start, step inside it, partial sums) from a checkpoint; mid-epoch after a stop."""
    if checkpoint.get("step_in_epoch"):
        return checkpoint["epoch"], checkpoint["step_in_epoch"], checkpoint.get("partial")
    return checkpoint["epoch"] + 1, 0, None


def train_epoch(epoch, start_step, partial, resumable, batch_size, make_state, output_dir, dist_info, stop,
                **engine_kwargs):
    """One epoch through ``engine.train_one_epoch``, from ``start_step`` (resume inside an epoch).

    A non-finite loss becomes a UserError (the last checkpoint stays); a stop request saves a
    mid-epoch checkpoint (``make_state(epoch, **position)``) and exits with PREEMPTED_EXIT_CODE."""
    from .engine import NonFiniteLoss, train_one_epoch
    resumable.set_epoch(epoch, start_step * batch_size)
    try:
        stats = train_one_epoch(epoch=epoch, start_step=start_step, partial=partial, should_stop=stop, **engine_kwargs)
    except NonFiniteLoss as e:
        raise UserError(str(e)) from None
    if "stopped_at_step" in stats:
        step = stats["stopped_at_step"]
        stop_after_signal(make_state(epoch, step_in_epoch=step, partial=stats["partial"]), output_dir,
                          dist_info.is_main, stop, epoch, step)
    return stats


def stop_after_signal(state, output_dir, is_main, stop, epoch, step):
    """Save a mid-epoch checkpoint (``state`` plus the position) and exit with PREEMPTED_EXIT_CODE."""
    save_checkpoint(state, os.path.join(output_dir, CHECKPOINT), is_main)
    logger.warning(f"stopped by {stop.name} at epoch {epoch}, step {step}: checkpoint saved to "
                   f"{os.path.join(output_dir, CHECKPOINT)}; run the same command again to continue from there")
    raise SystemExit(PREEMPTED_EXIT_CODE)


def start_run(args, dist_info):
    """Checks and the arguments log line both recipes begin with; returns the autocast dtype (None: fp32)."""
    if args.local_loss and not args.gather_with_grad:
        raise UserError("--local-loss needs --gather-with-grad")
    args.world_size = dist_info.world_size
    logger.info("arguments: " + json.dumps(vars(args), sort_keys=True))
    return getattr(torch, args.amp_dtype) if args.amp_dtype else None


def text_config(args, embeddings, world_size):
    """Log what the alignment does (or that it is off); return the engine's ``text`` dict or None."""
    if embeddings is None:
        logger.info("text alignment: off (baseline)")
        return None
    logger.info(describe_alignment(args.loss_type, args.tau, args.lamb, args.gather_with_grad, args.local_loss,
                                   world_size))
    return {"loss_type": args.loss_type, "tau": args.tau, "lamb": args.lamb,
            "gather_with_grad": args.gather_with_grad, "local_loss": args.local_loss}


def add_common_args(p):
    """Flags that both recipes share beyond their original ones."""
    p.add_argument("--amp-dtype", choices=["float16", "bfloat16"], default=None,
                   help="autocast dtype (float16 uses a checkpointed GradScaler; bfloat16 needs none)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--gather-with-grad", action="store_true",
                   help="clip loss: gathered features carry gradient (weight lamb, not lamb/W; a deviation)")
    p.add_argument("--local-loss", action="store_true",
                   help="clip loss with --gather-with-grad: compute only this rank's rows (same gradient, less memory)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--skip-corrupt-images", action="store_true",
                   help="replace a training image that cannot be decoded by the next one (warned and counted in "
                        "log.txt) instead of stopping")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="end this invocation after N epochs (job time limits); run the same command to continue")
    p.add_argument("--local-rank", "--local_rank", type=int, default=None, dest="local_rank",
                   help="set by the legacy torch.distributed.launch without --use_env")
    return p


def load_image(path):
    """Open an image as RGB; a file PIL cannot decode is a UserError that names it."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
            # an RGB file is used as decoded: convert("RGB") would only copy it (~1 ms per ImageNet JPEG)
            return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot decode image {path} ({e}); replace or delete the file, "
                        f"or pass --skip-corrupt-images") from None


class SkipCorrupt(torch.utils.data.Dataset):
    """With --skip-corrupt-images: a sample whose image cannot be decoded is replaced by the next
    good one (image, target and text embedding together, so pairs stay intact); counted in
    ``skipped``, shared by all loader workers."""

    def __init__(self, dataset):
        import multiprocessing
        self.dataset = dataset
        self.skipped = multiprocessing.Value("i", 0)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        for offset in range(len(self.dataset)):
            try:
                return self.dataset[(index + offset) % len(self.dataset)]
            except UserError as e:
                with self.skipped.get_lock():
                    self.skipped.value += 1
                logger.warning(f"skipping: {e}")
        raise UserError("no image of the training set can be decoded")


def build_image_folders(root, train_transform, val_transform):
    """``root/train`` and ``root/val`` as ImageFolders, refusing a missing split or differing classes."""
    import torchvision
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise UserError(f"{os.path.join(root, split)!r} does not exist; --data must hold train/ and val/ "
                            f"folders with one sub-folder per class")
    try:
        train = torchvision.datasets.ImageFolder(os.path.join(root, "train"), train_transform, loader=load_image)
        val = torchvision.datasets.ImageFolder(os.path.join(root, "val"), val_transform, loader=load_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"cannot read the image folders under {root!r}: {e}") from None
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))[:3]
        only_val = sorted(set(val.classes) - set(train.classes))[:3]
        raise UserError(f"{root}: train has {len(train.classes)} classes and val {len(val.classes)}, and they differ "
                        f"(only in train: {only_train}, only in val: {only_val}); both splits need the same class folders")
    return train, val


def generated_datasets(num_classes, input_size, train_size, val_size, train_transform, val_transform):
    """Random-image datasets (as the original's FakeData) for a run without --data."""
    import torchvision
    size = (3, input_size, input_size)
    train = torchvision.datasets.FakeData(train_size, size, num_classes, train_transform, random_offset=0)
    val = torchvision.datasets.FakeData(val_size, size, num_classes, val_transform, random_offset=10 ** 6)
    return train, val


def attach_text_embeddings(train, text_emb, generated):
    """Return (dataset yielding (image, target, embedding), TextEmbeddings) or (train, None)."""
    if text_emb is None or str(text_emb).lower() == "none":
        return train, None
    if generated and not os.path.isfile(text_emb):
        embeddings = SyntheticTextEmbeddings(len(train), 1024)
        logger.info(f"generated data: random {len(train)} x 1024 text embeddings (no file {text_emb!r} needed)")
    else:
        embeddings = load_text_embeddings(text_emb)
    return WithTextEmbeddings(train, embeddings), embeddings


def epoch_row(epoch, train_stats, test_stats, ema_stats=None, train_set=None, **extra):
    """One log.txt line: train_* and test_* (and ema_test_*) metrics, timing, and ``extra``."""
    row = {"epoch": epoch, "lr": train_stats["lr"]}
    row.update({f"train_{k}": v for k, v in train_stats.items() if k not in ("images_per_s", "epoch_time_s", "steps")})
    row.update({f"test_{k}": v for k, v in test_stats.items()})
    row.update({f"ema_test_{k}": v for k, v in (ema_stats or {}).items()})
    row.update(epoch_time_s=train_stats["epoch_time_s"], images_per_s=train_stats["images_per_s"])
    if isinstance(train_set, SkipCorrupt):
        row["train_corrupt_images_skipped"] = train_set.skipped.value
    row.update(extra)
    return row


class RunRecord:
    """args.json, log.txt (one JSON object per epoch) and TensorBoard scalars, on the main rank."""

    def __init__(self, output_dir, args, is_main):
        self.output_dir, self.is_main = output_dir, is_main
        self.writer = None
        if is_main:
            ensure_writable_dir(output_dir)
            atomic_write_json(os.path.join(output_dir, "args.json"), vars(args))
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:
                logger.warning("tensorboard is not installed: no TensorBoard scalars")

    def log_epoch(self, stats):
        if not self.is_main:
            return
        with open(os.path.join(self.output_dir, "log.txt"), "a") as f:
            f.write(json.dumps(stats) + "\n")
        if self.writer is not None:
            for k, v in stats.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.writer.add_scalar(k, v, stats["epoch"])
            self.writer.flush()

    def truncate_after(self, epoch):
        """On resume, drop log lines of epochs the checkpoint does not hold (a run killed mid-way)."""
        path = os.path.join(self.output_dir, "log.txt")
        if not self.is_main or not os.path.isfile(path):
            return
        with open(path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln).get("epoch", -1) < epoch]
        with open(path, "w") as f:
            f.writelines(lines)

    def close(self):
        if self.writer is not None:
            self.writer.close()


def find_resume(resume, output_dir):
    """Checkpoint to resume from: ``--resume PATH``, else ``<output_dir>/checkpoint.pth`` if present."""
    if resume:
        return resume
    path = os.path.join(output_dir, CHECKPOINT)
    return path if os.path.isfile(path) else None


def checkpoint_state(recipe, arch, text_dim, epoch, best, model, optimizer, scheduler, scaler, args, ema=None,
                     **position):
    """The one checkpoint format of both recipes (``model`` is the TextAlignedModel without DDP)."""
    return {"recipe": recipe, "arch": arch, "text_dim": text_dim, "epoch": epoch, "best": best,
            "model": model.backbone.state_dict(),
            "projection_head": model.projection_head.state_dict() if model.projection_head is not None else None,
            "model_ema": ema.module.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "args": vars(args), **position}


def resume_run(resume, output_dir, recipe, arch, text_dim, model, optimizer, scheduler, scaler, record, ema=None):
    """Restore a run from ``--resume`` or ``output_dir/checkpoint.pth`` if there is one.

    Returns None (fresh run) or (start epoch, step inside it, partial epoch sums, best)."""
    path = find_resume(resume, output_dir)
    if not path:
        return None
    checkpoint = load_checkpoint(path)
    check_compatible(checkpoint, path, recipe, arch, text_dim)
    model.backbone.load_state_dict(checkpoint["model"])
    if model.projection_head is not None and checkpoint.get("projection_head"):
        model.projection_head.load_state_dict(checkpoint["projection_head"])
    if ema is not None and checkpoint.get("model_ema"):
        ema.module.load_state_dict(checkpoint["model_ema"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    epoch, step, partial = resume_position(checkpoint)
    record.truncate_after(epoch)
    logger.info(f"resuming from {path}: continuing at epoch {epoch}, step {step}")
    return epoch, step, partial, checkpoint.get("best")


def wrap_distributed(model, dist_info, sync_bn=False):
    """SyncBN (optional) and DDP when several processes run; returns the model to train with."""
    if not dist_info.distributed:
        return model
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device = dist_info.device
    # gradients live in DDP's all-reduce buckets: no copy in and out of them after every backward
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                     gradient_as_bucket_view=True)


def load_classifier_weights(backbone, state, path):
    """Load a plain torchvision/timm state dict, or our checkpoint's ``model`` entry, into ``backbone``."""
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        backbone.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"checkpoint {path!r} does not fit this model ({first}); pass the same architecture") from None
