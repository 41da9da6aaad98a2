"""One run at a time per output folder: ``<output_dir>/run.lock``."""
import json
import os
import socket

from ..errors import UserError
from ..io import atomic_write_text, ensure_writable_dir
from ..log import logger

LOCK = "run.lock"


def _job_id():
    return os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID")


class RunLock:
    """One run at a time per output folder: ``<output_dir>/run.lock`` holds the host, PID and job of the
    run that owns it. A lock of a dead process on this host, or of the same torchrun/SLURM job (a
    restart or a requeue), is taken over and said so; any other is refused at once. Only the main
    rank locks. A refused or failed start removes the folder again when it created it empty."""

    def __init__(self, output_dir, is_main):
        self.output_dir, self.is_main = output_dir, is_main
        self.path = os.path.join(output_dir, LOCK)
        self.created_dir = False

    def __enter__(self):
        if not self.is_main:
            return self
        self.created_dir = not os.path.exists(self.output_dir)
        ensure_writable_dir(self.output_dir)
        mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "job": _job_id()})
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            self._take_over_or_refuse()
            atomic_write_text(self.path, mine + "\n")
            return self
        with os.fdopen(fd, "w") as f:
            f.write(mine + "\n")
        return self

    def _take_over_or_refuse(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                holder = json.loads(f.read() or "{}")
        except (OSError, ValueError):
            holder = {}
        host, pid, job = holder.get("host"), holder.get("pid"), holder.get("job")
        if job and job == _job_id():
            logger.warning(f"{self.path}: taking over the lock of an earlier process of this job ({job})")
            return
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            logger.warning(f"{self.path}: taking over a stale lock (process {pid} on {host} is gone)")
            return
        if not holder:
            logger.warning(f"{self.path}: taking over an unreadable lock")
            return
        raise UserError(f"{self.output_dir!r} is in use by another run (process {pid} on {host}, see {self.path}); "
                        f"use another output folder, or, if that run is no longer running, delete {self.path}")

    def __exit__(self, *exc):
        if not self.is_main:
            return False
        try:
            os.unlink(self.path)
        except OSError:
            pass
        if self.created_dir:
            try:
                os.rmdir(self.output_dir)  # only when empty: a refused start leaves nothing behind
            except OSError:
                pass
        return False


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
