"""Small file helpers shared by every entry point: atomic writes, hashes, writability checks."""
import hashlib
import json
import os
import tempfile

import torch

from .errors import UserError


def _atomic_write(path, write_fn):
    """Write through ``write_fn(file_object)`` into a temporary file beside ``path``, fsync it, then
    rename it over ``path``: a reader (or a kill at any moment) sees the old file or the new one,
    never a truncated one."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_torch_save(obj, path):
    """``torch.save`` that never leaves a partial file at ``path``."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text):
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_lines(lines):
    """Hash of an ordered list of strings (one per line, UTF-8): how file lists are compared."""
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def ensure_writable_dir(path, what="output directory"):
    """Create ``path`` if needed and check that a file can be created in it."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to the {what} {path!r} ({e.strerror}); "
                        f"choose a directory you can write to") from None
