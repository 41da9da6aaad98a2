"""Small file helpers shared by every entry point: atomic writes, hashes, writability checks."""
import errno
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
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) or "write failed" in str(e) or "failed writing" in str(e):
            raise _disk_error(e, path) from None  # torch.save reports a full disk as a RuntimeError
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


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


def _disk_error(error, path):
    """A UserError for a write that failed on the file system (disk full, quota, permissions)."""
    code = getattr(error, "errno", None)
    try:
        full = os.statvfs(os.path.dirname(os.path.abspath(path))).f_bavail == 0
    except OSError:
        full = False
    if code in (errno.ENOSPC, errno.EDQUOT) or full:
        return UserError(f"no space left on device while writing {path!r} (in {os.path.dirname(os.path.abspath(path))!r});"
                         f" free space there or choose another output folder; the previous {os.path.basename(path)} "
                         f"is kept as it was")
    reason = error.strerror if isinstance(error, OSError) and error.strerror else " ".join(str(error).split())
    return UserError(f"cannot write {path!r} ({reason}); the previous file is kept as it was")


def load_error(error):
    """Why ``torch.load`` refused a file, in one line. A file that holds arbitrary Python objects is
    refused by ``weights_only=True`` (unpickling it could run any code); torch's own message then
    advises ``weights_only=False``, which is unsafe for a file from elsewhere, so it is not repeated."""
    text = str(error)
    if "Weights only load failed" in text and "Unsupported global" not in text:
        return "its bytes are not a pickle, the format torch.save writes"
    if "Weights only load failed" in text:
        return ("it holds Python objects beyond tensors, numbers, strings, lists and dicts, which only a full "
                "unpickling could rebuild, and that can run any code: it is refused. Re-save its content as "
                "plain tensors / lists (or, for descriptions, as .json, .jsonl or .txt)")
    return f"{type(error).__name__}: {' '.join(text.split())}"


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


def refuse_repeated_dirs(root):
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


def atomic_write_lines(path, lines):
    """Write an iterable of bytes (each line with its newline) atomically, without holding them all."""
    _atomic_write(path, lambda f: f.writelines(lines))
