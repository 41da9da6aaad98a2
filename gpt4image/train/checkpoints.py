"""Where a run's checkpoints go, and the one full write per epoch.

An epoch's checkpoint is the state after its training and before its evaluation (so an error in the
evaluation loses no training); it keeps that epoch's training metrics as ``unevaluated``. After the
evaluation, log.txt gets the epoch's row, a new best becomes a hard link to that same file (a copy
where the file system has no hard links), and ``evaluated.json`` (a few bytes, written atomically)
says that the epoch was evaluated and what the best is now. A resume reads it: the checkpoint's epoch
is evaluated again only when the record does not name it (a run stopped between the two)."""
import errno
import json
import os
import shutil
from dataclasses import dataclass, field

from ..io import atomic_write_json
from ..log import logger
from .state_dicts import CHECKPOINT

EVALUATED = "evaluated.json"


def no_best() -> dict:
    return {"acc1": -1.0, "epoch": -1, "ema_acc1": -1.0, "ema_epoch": -1}


@dataclass(kw_only=True)
class Progress:
    """Where a run stands: the epoch (and step inside it) to train next, the partial sums of an epoch
    stopped inside, the training metrics of the epoch before ``epoch`` when its evaluation has not
    been recorded, and the best top-1 (raw and EMA) so far."""
    epoch: int = 0
    step: int = 0
    partial: list | None = None
    unevaluated: dict | None = None
    best: dict = field(default_factory=no_best)

    def update_best(self, test: dict, ema: dict | None, epoch: int) -> bool:
        """Take an epoch's evaluation into the best; True when its raw top-1 is a new best."""
        improved = test["acc1"] > self.best["acc1"]
        if improved:
            self.best.update(acc1=test["acc1"], epoch=epoch)
        if ema and ema["acc1"] > self.best["ema_acc1"]:
            self.best.update(ema_acc1=ema["acc1"], ema_epoch=epoch)
        return improved


def evaluation_record(checkpoint_path: str) -> dict | None:
    """The ``evaluated.json`` beside a checkpoint ({"epoch", "best"}), or None."""
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), EVALUATED)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("best"), dict) else None


def link_or_copy(source: str, target: str) -> None:
    """``target`` becomes ``source``'s file: a hard link (no bytes written), a copy where links are not
    supported (another file system, EPERM); atomically, through a temporary name and os.replace."""
    temporary = f"{target}.tmp{os.getpid()}"
    try:
        os.unlink(temporary)
    except FileNotFoundError:
        pass
    try:
        os.link(source, temporary)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        shutil.copyfile(source, temporary)
    os.replace(temporary, target)


@dataclass(kw_only=True)
class Checkpoints:
    """The checkpoint files of one output folder (written by the main rank only)."""
    output_dir: str
    best_name: str
    is_main: bool = True

    @property
    def path(self) -> str:
        return os.path.join(self.output_dir, CHECKPOINT)

    @property
    def best_path(self) -> str:
        return os.path.join(self.output_dir, self.best_name)

    def last_good(self) -> str:
        """For messages: the checkpoint a rerun continues from, or that there is none yet."""
        return f"the last good checkpoint is {self.path}" if os.path.isfile(self.path) else \
            "no checkpoint was written yet"

    def record_evaluation(self, epoch: int, best: dict, new_best: bool) -> None:
        """After epoch ``epoch``'s log row: a new best links to its checkpoint, then the small record."""
        if not self.is_main:
            return
        if new_best:
            link_or_copy(self.path, self.best_path)
        atomic_write_json(os.path.join(self.output_dir, EVALUATED), {"epoch": epoch, "best": best})

    def resumed(self, progress: Progress, path: str) -> Progress:
        """``progress`` of the checkpoint at ``path``, with an evaluation recorded since taken in."""
        record = evaluation_record(path)
        if progress.unevaluated is not None and record and record.get("epoch") == progress.epoch - 1:
            progress.unevaluated = None
            progress.best = {**no_best(), **record["best"]}
        elif progress.unevaluated is not None:
            logger.info(f"epoch {progress.epoch - 1} of {path} was not evaluated yet: evaluating it first")
        return progress
