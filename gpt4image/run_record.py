"""What a run leaves for people to read: args.json, log.txt (one JSON object per epoch), TensorBoard."""
import json
import os

from .distributed import logger
from .io import atomic_write_json, ensure_writable_dir


def epoch_row(epoch, train_stats, test_stats, ema_stats=None, **extra):
    """One log.txt line: train_* and test_* (and ema_test_*) metrics, timing, and ``extra``."""
    row = {"epoch": epoch, "lr": train_stats["lr"]}
    row.update({f"train_{k}": v for k, v in train_stats.items() if k not in ("images_per_s", "epoch_time_s", "steps")})
    row.update({f"test_{k}": v for k, v in test_stats.items()})
    row.update({f"ema_test_{k}": v for k, v in (ema_stats or {}).items()})
    row.update(epoch_time_s=train_stats["epoch_time_s"], images_per_s=train_stats["images_per_s"])
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
