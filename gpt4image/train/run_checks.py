"""Checks both recipes make of a run's settings before training: the identity of the text-embedding
table, loader workers against the cores this process may use, --accum-iter against the steps of an
epoch, and the learning rate actually trained at (its scaling, a run that never leaves warm-up)."""
import hashlib
import os

from ..log import logger
from ..errors import UserError

FINGERPRINT_BYTES = 1 << 20  # read from each end of the table
FINGERPRINT_KEY = "text_emb_fingerprint"


def table_fingerprint(embeddings) -> str | None:
    """What identifies a text-embedding table, cheaply (a table of ImageNet is 2.6 GB and is never
    read whole for this): sha256 of its size, its first and last MiB (the first and last rows, and
    torch.save's header and index) and, when the table has its ``<table>.json`` sidecar, the encoder
    and the hash of the description file it records. Another encoder or other descriptions give
    another fingerprint; a copy, a move or a ``touch`` of the same table does not. None for no table."""
    if embeddings is None:
        return None
    path = getattr(embeddings, "path", None)
    if not path or not os.path.isfile(path):
        return f"generated {len(embeddings)}x{embeddings.dim}"
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    digest.update(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        f.seek(max(size - FINGERPRINT_BYTES, 0))
        digest.update(f.read(FINGERPRINT_BYTES))
    metadata = embeddings.metadata or {}
    for key in ("encoder", "source_sha256", "file_list_sha256"):
        digest.update(f"{key}={metadata.get(key)}\n".encode())
    return digest.hexdigest()[:16]


def note_unfingerprinted(checkpoint_args: dict | None, path: str, args) -> None:
    """A checkpoint written before tables were fingerprinted still resumes; say once that its table
    cannot be checked."""
    if getattr(args, FINGERPRINT_KEY, None) and FINGERPRINT_KEY not in (checkpoint_args or {}):
        logger.info(f"{path} was written before runs recorded their --text_emb table's fingerprint: the table is "
                    f"taken as the one the run started with (not checked); checkpoints from now on record it")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a job scheduler may narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cap_workers(args, flag: str) -> None:
    """Loader workers beyond the cores available only compete with each other (and torch warns at
    every loader): cap ``args.<flag>`` at the cores available, said once at start."""
    name = flag.lstrip("-").replace("-", "_")
    wanted, cores = getattr(args, name), available_cores()
    if wanted > cores:
        setattr(args, name, cores)
        logger.info(f"{flag} {wanted}: this process may use {cores} core(s) (os.sched_getaffinity), so it loads "
                    f"data with {cores} worker(s)")


def check_accumulation(accum_iter: int, batches_per_epoch: int, batch_size: int, world_size: int) -> str:
    """Refuse --accum-iter larger than the batches an epoch has per process: no step would ever see the
    effective batch the lr is scaled for. Returns the remark for the start line when the epoch's last step
    sums fewer batches."""
    if accum_iter > batches_per_epoch:
        raise UserError(f"--accum-iter {accum_iter} is more than the {batches_per_epoch} batch(es) of {batch_size} an "
                        f"epoch has per process (over {world_size} process(es)), so no optimizer step would sum "
                        f"{accum_iter} batches; pass --accum-iter {batches_per_epoch} or less, or use more images")
    left = batches_per_epoch % accum_iter
    return f" (an epoch's last step sums the {left} remaining)" if accum_iter > 1 and left else ""


def scaled_lr(lr: float, global_batch: int, reference: int, unscaled: bool, unscaled_flag: str) -> tuple:
    """(the lr to train at, how it came about): ``lr x global batch / reference`` as released, or
    ``lr`` as given with ``unscaled_flag``."""
    if unscaled:
        return lr, f"--lr as given ({unscaled_flag})"
    return lr * global_batch / reference, f"--lr {lr:g} scaled to it by the global batch {global_batch} / {reference}"


def warn_if_all_warmup(epochs: int, warmup_epochs: int, peak: float, warmup_lr: float, positions: list,
                       lag_flag: str) -> None:
    """DeiT: a run whose every epoch is in the linear warm-up never trains at its peak lr; warn once
    at start with the lrs it will train at and the fix. ``positions``: the scheduler time of each epoch."""
    last = max(positions)
    if warmup_epochs == 0 or last >= warmup_epochs:
        return

    def lr_at(t):  # timm's warm-up: linear from warmup_lr at t = 0 to the peak at t = warmup_epochs
        return warmup_lr + t * (peak - warmup_lr) / warmup_epochs
    lag = "" if last == epochs - 1 else f", the released one-epoch lag ({lag_flag} removes it)"
    logger.warning(f"every epoch of this run is in the warm-up (--epochs {epochs}, --warmup-epochs {warmup_epochs}"
                   f"{lag}): it trains at lr {lr_at(min(positions)):.3g} to {lr_at(last):.3g}, never at the peak "
                   f"{peak:.3g}; pass --warmup-epochs {last} or less (or more --epochs) to reach it")
