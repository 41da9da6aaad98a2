"""What is wrong with a weights file, found without running anything in it.

Every tool that loads model weights (generate_descriptions' model folder, description2embedding's
``hf:`` folders, open_clip weights files and OpenAI CLIP checkpoints) checks them here first, so a
truncated ``.safetensors`` file or a pickle that would run code is one line naming the file:

- ``.safetensors``: the header (its length, its JSON, the byte ranges it gives its tensors) must
  match the file; a download cut short does not;
- a pickle (``.bin``, ``.pt``, ``.pth``, ``.ckpt``; torch's zip format or the legacy one) is read
  opcode by opcode with ``pickletools`` (nothing is executed) and the functions and classes it would
  call are listed; any beyond the tensors, containers and numbers torch's safe loader rebuilds means
  the file holds code that would run when unpickled: it is not loaded.
"""
from __future__ import annotations

import io
import json
import os
import pickletools
import struct
import zipfile

from .errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# what torch.load(weights_only=True) rebuilds: tensors, their storages, containers and numbers
SAFE_MODULES = {"torch", "torch._utils", "torch._tensor", "torch.nn.parameter", "torch.storage", "numpy",
                "numpy.core.multiarray", "numpy._core.multiarray", "numpy.dtypes"}
SAFE_CALLS = {"collections.OrderedDict", "_codecs.encode", "torch.serialization._get_layout"} | {
    f"{module}.{name}" for module in ("builtins", "__builtin__")
    for name in ("set", "frozenset", "bytearray", "slice", "complex", "int", "float", "bool", "str", "bytes", "list",
                 "dict", "tuple", "object")}


def safetensors_problem(path: str) -> str | None:
    """Why the .safetensors file ``path`` cannot be read, or None when its header matches it."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"it is {size} bytes long, too short for a .safetensors header (truncated)"
        length = struct.unpack("<Q", head)[0]
        if length > size - 8:
            return (f"its header announces {length} bytes but the file has {size - 8} after it "
                    f"(truncated, or not a .safetensors file)")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            return "its header is not JSON (corrupt, or not a .safetensors file)"
    if not isinstance(header, dict):
        return "its header is not a JSON object (corrupt)"
    ends = [entry.get("data_offsets", [0, 0])[1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict)]
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        return f"its tensors need {needed} bytes but the file has {size} (truncated: download it again)"
    return None


def pickle_calls(path: str, most: int = 5) -> list[str] | None:
    """``module.name`` of every global the pickle(s) in ``path`` would import and may call, read
    without unpickling; None when the file holds no complete pickle. A TorchScript archive (OpenAI's
    CLIP files) holds TorchScript, not Python code: no calls."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                if any(n.endswith("constants.pkl") for n in names):
                    return []
                data = [z.read(n) for n in names if n.endswith("data.pkl")]
            return _calls(io.BytesIO(data[0]), most) if data else None
        with open(path, "rb") as f:
            return _calls(f, most)
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return None


def _calls(stream, most):
    """Globals of up to ``most`` consecutive pickles in ``stream`` (torch's legacy format writes a
    few, then raw tensor bytes); None when not even the first is complete."""
    calls, complete = [], 0
    for _ in range(most):
        strings = []
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings = (strings + [arg])[-2:]
                elif op.name in ("GLOBAL", "INST"):
                    calls.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    calls.append(".".join(strings) if len(strings) == 2 else "an unnamed global")
        except Exception:  # noqa: BLE001  not (or no longer) a pickle
            break
        complete += 1
    return calls if complete else None


def unsafe_calls(calls: list[str]) -> list[str]:
    """The calls of ``calls`` beyond what rebuilds tensors, storages, containers and numbers
    (TorchScript's compiled ``__torch__`` classes included: they are not Python code)."""
    def safe(call: str) -> bool:
        module = call.rpartition(".")[0]
        return call in SAFE_CALLS or module in SAFE_MODULES or call.startswith("__torch__.")
    return sorted({c for c in calls if not safe(c)})


def pickle_problem(path: str) -> str | None:
    """Why the pickle ``path`` must not be loaded (or is no pickle), or None."""
    calls = pickle_calls(path)
    if calls is None:
        return "it is not a file torch.save writes (no pickle in it; truncated or another format)"
    unsafe = unsafe_calls(calls)
    if unsafe:
        shown = ", ".join(unsafe[:3]) + (f" and {len(unsafe) - 3} more" if len(unsafe) > 3 else "")
        return (f"it holds code that would run when it is unpickled (it calls {shown}): it was refused and not "
                f"loaded; use .safetensors weights, or re-save only its tensors, strings and lists from a trusted copy")
    return None


def file_problem(path: str) -> str | None:
    """Why the weights file ``path`` cannot be loaded safely, or None."""
    if path.endswith(".safetensors"):
        return safetensors_problem(path)
    return pickle_problem(path)


def check_weights(path: str, what: str = "weights") -> None:
    """Refuse a weights file (or every weights file of a folder) that is truncated, corrupt or would
    run code, in one line naming the file."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(WEIGHT_SUFFIXES))
        if any(f.endswith(".safetensors") for f in files):  # transformers reads these, not the pickles
            files = [f for f in files if f.endswith(".safetensors")]
    else:
        files = [path]
    for file in files:
        problem = file_problem(file)
        if problem:
            raise UserError(f"cannot load the {what} {file!r}: {problem}")


def load_failure(error: BaseException, directory: str, what: str) -> UserError:
    """A one-line UserError for a model folder transformers could not load (after ``check_weights``
    found its files sound: missing files, shapes that do not match the config, ...)."""
    from .io import load_error
    reason = " ".join(load_error(error).split())
    return UserError(f"{what}: cannot load the weights in {directory!r} ({reason[:300]}); the folder needs the "
                     f"model's weights as downloaded, matching its config.json")
