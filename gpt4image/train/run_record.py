"""What a run leaves for people to read: args.json, log.txt (one JSON object per epoch), TensorBoard."""
import json
import os
import socket
from collections.abc import Callable

from ..log import logger
from ..errors import UserError
from ..io import append_durably, atomic_write_json, atomic_write_text, ensure_writable_dir

def epoch_row(epoch: int, train_stats: dict, test_stats: dict, ema_stats: dict | None = None, **extra) -> dict:
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

    def __init__(self, output_dir: str, args: dict, is_main: bool, recipe: str | None = None):
        self.output_dir, self.is_main = output_dir, is_main
        self.writer = self.wandb = None
        if is_main:
            ensure_writable_dir(output_dir)
            # the recipe's name first: the report tells our runs from another tool's args.json by it
            atomic_write_json(os.path.join(output_dir, "args.json"), {"recipe": recipe, **args})
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:
                logger.warning("tensorboard is not installed: no TensorBoard scalars")
            if args.get("wandb_project"):
                self.wandb = start_wandb(args, output_dir)

    def log_step(self, global_step: int, scalars: dict) -> None:
        """Per-step scalars (every print step) to TensorBoard and W&B."""
        if not self.is_main:
            return
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, global_step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=global_step)

    def log_epoch(self, stats: dict) -> None:
        if not self.is_main:
            return
        path = os.path.join(self.output_dir, "log.txt")
        _drop_partial_last_line(path)
        append_durably(path, (json.dumps(stats) + "\n").encode("utf-8"))
        if self.writer is not None:
            for k, v in stats.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.writer.add_scalar(k, v, stats["epoch"])
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log({f"epoch/{k}": v for k, v in stats.items() if isinstance(v, (int, float))})

    def truncate_after(self, epoch: int) -> None:
        """On resume, drop log lines of epochs the checkpoint does not hold (a run killed mid-way), and
        any line that is not a JSON object (one cut short by a kill)."""
        path = os.path.join(self.output_dir, "log.txt")
        if not self.is_main or not os.path.isfile(path):
            return
        rows = read_log(path)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows if r.get("epoch", -1) < epoch))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def require_wandb(args) -> None:
    """Checked with the other arguments, before anything is written: --wandb-project needs wandb."""
    if getattr(args, "wandb_project", None):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("--wandb-project needs Weights & Biases: pip install wandb (or leave the flag out; "
                            "TensorBoard scalars are always written)") from None


def _online():
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=3).close()
        return True
    except OSError:
        return False


def start_wandb(args: dict, output_dir: str):
    """A W&B run in ``output_dir`` with every argument (``args``: as recorded) as its config; offline (synced later with
    ``wandb sync``) when W&B cannot be reached or --wandb-mode says so."""
    import wandb
    mode = args["wandb_mode"] or os.environ.get("WANDB_MODE") or ("online" if _online() else "offline")
    if mode == "offline":
        logger.info(f"W&B: offline, in {output_dir}/wandb (upload later with 'wandb sync')")
    return wandb.init(project=args["wandb_project"], name=os.path.basename(os.path.abspath(output_dir)),
                      dir=output_dir, config=args, mode=mode, resume="allow",
                      id=f"{os.path.basename(os.path.abspath(output_dir))}-{args['seed']}")


def read_log(path: str, warn: Callable[[str], None] | None = None) -> list:
    """The rows of a log.txt; blank lines are skipped, and so is a line that is not a JSON object (a
    kill between a write and its newline), with ``warn(message)`` naming the file and the line."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: thousands of nested brackets
                row = None
            if isinstance(row, dict) and isinstance(row.get("epoch"), int) and not isinstance(row["epoch"], bool):
                rows.append(row)
            elif warn is not None:
                warn(f"{path}:{number}: skipped a line that is not a log row ({line.strip()[:60]!r})")
    return rows


def _drop_partial_last_line(path):
    """A kill between a write and its newline leaves a partial last line: cut it before appending."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)
        logger.warning(f"{path}: removed a partial last line (a run stopped while writing it)")
