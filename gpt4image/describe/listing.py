"""The images to describe: an ImageFolder train directory or a text file of image paths, each image
with its index, the path written to the output and its class folder; and the class names of
``--class-names``. Every reader of image lists and description files lists folders, splits lines
and spells paths through ``list_image_folder``, ``text_lines`` and ``canonical_path``.
"""
import json
import os
from dataclasses import dataclass

from ..errors import UserError
from ..io import refuse_repeated_dirs


@dataclass(frozen=True, kw_only=True)
class ImageItem:
    index: int
    path: str  # as written to the output: relative to --data (or as listed in the text file)
    file: str  # where to read it
    class_name: str | None = None  # the class folder's name; None for a plain list of images


def list_image_folder(root: str) -> list[str]:
    """Relative paths (``class/file``, '/'-separated) of the samples of
    ``torchvision.datasets.ImageFolder(root)``, in its order, without opening any image."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    if not os.path.isdir(root):
        raise UserError(f"image folder {root!r} does not exist; pass the train folder "
                        f"(the one holding one sub-folder per class)")
    refuse_repeated_dirs(root)
    refuse_dataset_root(root)
    try:
        _, class_to_idx = find_classes(root)
        samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"{root!r} is not an ImageFolder: {e}") from None
    prefix = os.path.join(root, "")  # make_dataset joins root and the path: cut it off (10x faster than relpath)
    return [(path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)).replace(os.sep, "/")
            for path, _ in samples]


def text_lines(text: str) -> list[str]:
    """The lines of a text file: only ``\\n`` and ``\\r\\n`` end one (``str.splitlines`` would also split
    at U+2028, U+2029, U+0085, form feeds and other characters a description may hold)."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def refuse_dataset_root(root: str) -> None:
    """A folder holding ``train/`` and ``val/`` (the root training takes) is not a train folder: as an
    ImageFolder it would make ``train`` and ``val`` two classes and describe the validation images."""
    if all(os.path.isdir(os.path.join(root, split)) for split in ("train", "val")):
        train = os.path.join(root, "train")
        raise UserError(f"{root!r} is a dataset root (it holds train/ and val/), not a train folder; pass "
                        f"{train!r} (and, for the validation images, a second run on {os.path.join(root, 'val')!r})")


def canonical_path(path: str, root: str) -> str:
    """The one spelling of an image path, used by every reader of image lists and description files:
    ``./a``, ``a//b``, ``a/./b``, ``a\\b``, ``//root/a`` and the absolute path of a file under ``root``
    all become ``a``-style paths relative to ``root`` ('/'-separated); a path outside ``root``
    becomes its absolute, normalised form."""
    import posixpath
    path = path.replace("\\", "/")
    root = os.path.abspath(root).replace(os.sep, "/")
    full = posixpath.normpath(posixpath.join(root, path))
    if full.startswith("//"):  # POSIX keeps a leading "//" apart; it names the same file as "/"
        full = "/" + full.lstrip("/")
    relative = posixpath.relpath(full, root)
    return full if relative == ".." or relative.startswith("../") else relative


def list_images(data: str) -> list[ImageItem]:
    """Images of an ImageFolder directory (its order) or of a text file with one path per line
    (relative paths are relative to the file's folder)."""
    if os.path.isdir(data):
        return [ImageItem(index=i, path=rel, file=os.path.join(data, rel), class_name=rel.split("/")[0])
                for i, rel in enumerate(list_image_folder(data))]
    if not os.path.isfile(data):
        raise UserError(f"--data {data!r} does not exist; pass an ImageFolder train directory "
                        f"or a text file with one image path per line")
    base = os.path.dirname(os.path.abspath(data))
    try:
        with open(data, encoding="utf-8", newline="") as f:
            paths = [line.strip() for line in text_lines(f.read()) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the image list {data!r} ({e}); pass a UTF-8 text file with one "
                        f"image path per line, or an ImageFolder directory") from None
    if not paths:
        raise UserError(f"the image list {data!r} names no image")
    seen = {}
    for path in paths:
        key = canonical_path(path, base)
        if key in seen:
            same = "" if seen[key] == path else f" (as {seen[key]!r} too)"
            raise UserError(f"the image list {data!r} names {path!r} more than once{same}; list each image once")
        seen[key] = path
    return [ImageItem(index=i, path=p, file=p if os.path.isabs(p) else os.path.join(base, p))
            for i, p in enumerate(paths)]


def read_class_names(path: str, classes: set[str]) -> dict[str, str]:
    """``{folder name: words}`` from a .json object or a text file of ``folder words...`` lines (the
    format of ImageNet's LOC_synset_mapping.txt; only the first comma-separated name is used)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if path.lower().endswith(".json"):
                names = json.load(f)
                if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
                    raise ValueError("not an object mapping folder names to strings")
            else:
                names = {}
                for line in text_lines(f.read()):
                    folder, _, words = line.strip().partition(" ")
                    if folder:
                        names[folder] = words.split(",")[0].strip() or folder
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"cannot read --class-names {path!r} ({e}); pass a JSON object "
                        f"{{folder: name}} or lines 'folder name'") from None
    missing = sorted(set(classes) - set(names))
    if missing:
        raise UserError(f"--class-names {path!r} has no name for {len(missing)} class folders "
                        f"(first: {', '.join(missing[:3])}); add them")
    return names
