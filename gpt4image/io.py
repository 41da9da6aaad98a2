"""Small file helpers shared by every entry point: atomic writes, hashes, writability checks."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable

import torch

from .errors import UserError


def _atomic_write(path, write_fn):
    """Write through ``write_fn(file_object)`` into a temporary file beside ``path``, fsync it, then
    rename it over ``path``: a reader (or a kill at any moment) sees the old file or the new one,
    never a truncated one."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    except OSError as e:
        raise _disk_error(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException as e:
        error = _disk_error(e, path) if is_write_failure(e) else None  # before the space is freed again
        if os.path.exists(tmp):
            os.unlink(tmp)
        if error is not None:
            raise error from None
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


# How torch.save reports a failed write (a full disk among them): a RuntimeError from its zip writer,
# "[enforce fail at inline_container.cc:...] . unexpected pos N vs M" or "... file write failed".
_TORCH_WRITE_FAILURES = ("unexpected pos", "write failed", "failed writing", "inline_container")


def is_write_failure(error: BaseException) -> bool:
    """True for an error that says a write to the file system failed (OSError, or torch.save's
    RuntimeError for the same thing)."""
    return isinstance(error, OSError) or (isinstance(error, RuntimeError) and
                                          any(text in str(error) for text in _TORCH_WRITE_FAILURES))


def append_durably(path: str, data: bytes) -> None:
    """Append ``data`` (bytes) to ``path`` and fsync it. A failed write (a full disk) cuts the file
    back to its previous end, so no partial line is left behind, and is a one-line UserError."""
    with open(path, "ab", buffering=0) as f:
        start = f.seek(0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[f.write(view):]
            os.fsync(f.fileno())
        except BaseException as e:  # a full disk, or Ctrl-C in the middle of the write
            try:
                os.truncate(path, start)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise _disk_error(e, path, kept="the records written before") from None
            raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode_for(path):
    """A replaced file keeps its mode; a new one gets the user's umask (as open() would), not
    mkstemp's 0600, so a shared cluster group can read tables, checkpoints and classifiers."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        return 0o666 & ~_umask()


def _disk_error(error, path, kept=None):
    """A UserError for a write that failed on the file system (disk full, quota, permissions)."""
    kept = kept or f"the previous {os.path.basename(path)}"
    code = getattr(error, "errno", None)
    try:  # torch.save's RuntimeError carries no errno: a disk with (almost) nothing left is full
        stat = os.statvfs(os.path.dirname(os.path.abspath(path)))
        full = stat.f_bavail * stat.f_frsize < (1 << 20)
    except OSError:
        full = False
    if code in (errno.ENOSPC, errno.EDQUOT) or full:
        return UserError(f"no space left on device while writing {path!r} "
                         f"(in {os.path.dirname(os.path.abspath(path))!r});"
                         f" free space there or choose another output folder; {kept} is kept as it was")
    reason = error.strerror if isinstance(error, OSError) and error.strerror else " ".join(str(error).split())
    return UserError(f"cannot write {path!r} ({reason}); {kept} is kept as it was")


def load_error(error: BaseException, path: str | None = None) -> str:
    """Why ``torch.load`` refused a file, in one line. torch's own message for a file its safe
    loader (``weights_only=True``) refuses advises ``weights_only=False``, which would run whatever
    code the file holds: it is never repeated. With ``path``, the file is read opcode by opcode
    (``weights.file_problem``, nothing executed) to say what it holds."""
    text = str(error)
    if path is not None and os.path.isfile(path):
        from .weights import file_problem
        problem = file_problem(path)
        if problem:
            return problem
    if "Weights only load failed" in text:
        return ("torch's safe loader refused it: it holds Python objects beyond tensors, numbers, strings, lists "
                "and dicts, whose unpickling could run code, so it was not loaded. Re-save its content as plain "
                "tensors / lists (or, for descriptions, as .json, .jsonl or .txt)")
    return f"{type(error).__name__}: {' '.join(text.split())}"


def atomic_torch_save(obj: object, path: str) -> None:
    """``torch.save`` that never leaves a partial file at ``path``."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str, obj: object) -> None:
    """Write ``obj`` as indented JSON with sorted keys to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of the file's bytes, read ``chunk`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_lines(lines: Iterable[str]) -> str:
    """Hash of an ordered list of strings (one per line, UTF-8): how file lists are compared."""
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def refuse_repeated_dirs(root: str) -> None:
    """Walk ``root`` as ImageFolder does (following directory links) and refuse a directory reached
    twice: a link to an ancestor (``loop -> .``) would repeat the images below it until the path is
    too long, silently multiplying a class; two links to one folder would count its images twice."""
    seen = {}
    stack = [root]
    while stack:
        path = stack.pop()
        try:
            st = os.stat(path)
            entries = list(os.scandir(path))
        except OSError:
            continue  # unreadable: ImageFolder itself reports it
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise UserError(f"{path!r} is the folder {seen[key]!r} again (through a symbolic link), so its images "
                            f"would be read more than once; remove the link or point it elsewhere")
        seen[key] = path
        stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=True))


def ensure_writable_dir(path: str, what: str = "output directory") -> None:
    """Create ``path`` if needed and check that a file can be created in it."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to the {what} {path!r} ({e.strerror}); "
                        f"choose a directory you can write to") from None


def atomic_write_lines(path: str, lines: Iterable[bytes]) -> None:
    """Write an iterable of bytes (each line with its newline) atomically, without holding them all."""
    _atomic_write(path, lambda f: f.writelines(lines))
