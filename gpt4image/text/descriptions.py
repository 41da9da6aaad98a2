"""Reading image descriptions in every form we accept.

Accepted inputs (each holds one description per training image):
- ``.pth``: ``torch.save`` of a list of str (the authors' release) or of a dict path -> str;
- ``.txt``: one description per line;
- ``.json``: a list of str, or an object mapping image path (relative to the train folder) -> str;
- ``.jsonl``: one JSON value per line: a str, or an object with a ``description`` (or ``caption``
  / ``text``) field and optionally a ``path`` (or ``image`` / ``file``) field.
A list is in ImageFolder order (entry k describes sample k); a path-keyed input is put into that
order with ``--data``.
"""
import json
import os
from dataclasses import dataclass

import torch

from ..describe.listing import canonical_path, list_image_folder, list_images, text_lines
from ..errors import UserError
from ..io import load_error

TEXT_KEYS = ("description", "caption", "text")
PATH_KEYS = ("path", "image", "file")


def _load_raw(path):
    """The file's content as a list (ordered) or dict (path-keyed)."""
    if not os.path.isfile(path):
        raise UserError(f"description file {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise UserError(f"description file {path!r} is empty; it must hold one description per image")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext in (".pth", ".pt"):
            return torch.load(path, map_location="cpu", weights_only=True)
        with open(path, encoding="utf-8", newline="") as f:
            if ext == ".txt":
                return text_lines(f.read())
            if ext == ".json":
                return json.load(f, object_pairs_hook=lambda pairs: _unique_keys(path, pairs))
            if ext == ".jsonl":
                return _parse_jsonl(path, text_lines(f.read()))
    except UserError:
        raise
    except Exception as e:  # unreadable pickle, bad JSON, bad UTF-8: all the user's file
        raise UserError(f"cannot read description file {path!r}: {load_error(e, path)}") from None
    raise UserError(f"description file {path!r} has an unknown extension {ext!r}; "
                    f"use .pth, .txt, .json or .jsonl")


class _Keyed(dict):
    """image path (or ``(path, k)`` for description k of several) -> description; ``flagged``: the
    keys whose record carries quality ``"flags"`` (generate_descriptions.py's gate)."""

    def __init__(self):
        super().__init__()
        self.flagged = set()


def _parse_jsonl(path, lines):
    ordered, keyed, keyed_lines = [], _Keyed(), {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}:{number}: not a JSON value ({e}); every line must be one JSON string or "
                            f"object") from None
        if isinstance(value, dict):
            field = next((k for k in TEXT_KEYS if k in value), None)
            key = next((value[k] for k in PATH_KEYS if k in value), None)
            if field is None:
                raise UserError(f"{path}:{number}: object has none of the fields {TEXT_KEYS}")
            text = value[field]
            if text is None:
                raise UserError(f"{path}:{number}: \"{field}\" is null; every image needs a description string "
                                f"(describe that image again, or leave it out of the data)")
            if key is not None and not isinstance(key, str):
                raise UserError(f"{path}:{number}: the image path is a {type(key).__name__}, not a string")
            if key is not None:
                if "k" in value:
                    if not isinstance(value["k"], int) or isinstance(value["k"], bool) or value["k"] < 0:
                        raise UserError(f"{path}:{number}: \"k\" is {value['k']!r}; it must be the description's "
                                        f"index 0, 1, ... as generate_descriptions.py --num-descriptions writes it")
                    key = (key, value["k"])
                if value.get("flags"):
                    keyed.flagged.add(key)
                if key in keyed:
                    raise UserError(f"{path}:{number}: image {key!r} is described a second time (first at line "
                                    f"{keyed_lines[key]}); keep one description per image")
                keyed[key], keyed_lines[key] = text, number
                continue
            value = text
        ordered.append(value)
    if ordered and keyed:
        raise UserError(f"{path}: some lines name an image path and some do not; use one form")
    return keyed or ordered


def _check_texts(path, texts, labels):
    bad_type = [(lab, type(t).__name__) for lab, t in zip(labels, texts) if not isinstance(t, str)]
    if bad_type:
        shown = ", ".join(f"{lab} ({kind})" for lab, kind in bad_type[:5])
        raise UserError(f"{path}: {len(bad_type)} entries are not strings, first: {shown}; "
                        f"every entry must be a description string")
    empty = [lab for lab, t in zip(labels, texts) if not t.strip()]
    if empty:
        raise UserError(f"{path}: {len(empty)} descriptions are empty, first: "
                        f"{', '.join(map(str, empty[:5]))}; every image needs a non-empty description")


def _unique_keys(path, pairs):
    """``object_pairs_hook`` of json.load: a key given twice is an error, not a silent overwrite."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise UserError(f"{path}: key {key!r} appears twice; keep one description per image")
        seen[key] = value
    return seen


def _listed_files(data):
    """``(paths, folder they are relative to)`` of ``--data``: an ImageFolder train directory (its
    ``class/file`` paths) or a text file of image paths (as generate_descriptions takes); (None, None)."""
    if not data:
        return None, None
    if os.path.isfile(data):
        return [item.path for item in list_images(data)], os.path.dirname(os.path.abspath(data))
    return list_image_folder(data), data


@dataclass(kw_only=True)
class DescriptionSet:
    """What read_description_set returns: ``texts`` in ImageFolder order (one str per image, or a
    list of K per image), ``files`` (relative paths of the images kept, or None), ``per_image`` (K),
    ``flagged`` (records with quality flags), ``left_out`` (images dropped: every description
    flagged), ``replaced`` (flagged descriptions replaced by another of the same image)."""
    texts: list
    files: list[str] | None
    per_image: int = 1
    flagged: int = 0
    left_out: int = 0
    replaced: int = 0


def read_descriptions(path: str, image_folder: str | None = None) -> tuple[list[str], list[str] | None]:
    """Return ``(descriptions, file_list)``.

    ``descriptions`` is a list of str in ImageFolder order. ``file_list`` is the ordered list of
    relative image paths when ``image_folder`` is given (None otherwise); a path-keyed input is
    reordered to it, and a path missing on either side is an error.
    """
    found = read_description_set(path, image_folder)
    return found.texts, found.files


def _group_by_image(path, keyed):
    """``{path: [description k for k = 0..K-1]}`` of a keyed input whose records carry ``"k"``, and
    ``{path: [flagged k]}``; every image needs every k."""
    if not all(isinstance(key, tuple) for key in keyed):
        raise UserError(f"{path}: some records carry a description index \"k\" and some do not; use one form")
    per_image = max(k for _, k in keyed) + 1
    grouped, flagged = {}, {}
    for (image, k), text in keyed.items():
        grouped.setdefault(image, [None] * per_image)[k] = text
        if (image, k) in keyed.flagged:
            flagged.setdefault(image, []).append(k)
    incomplete = next((image for image, texts in grouped.items() if None in texts), None)
    if incomplete is not None:
        have = [k for k, t in enumerate(grouped[incomplete]) if t is not None]
        raise UserError(f"{path}: image {incomplete!r} has descriptions k = {have} of {per_image}; every image needs "
                        f"all {per_image} (run generate_descriptions.py again to finish them)")
    return grouped, flagged, per_image


def read_description_set(path: str, image_folder: str | None = None, drop_flagged: bool = False) -> DescriptionSet:
    """The descriptions of ``path`` as a DescriptionSet (see there). A path-keyed input is put
    into the order of ``image_folder``; records with ``"k"`` give K descriptions per image.
    ``drop_flagged``: records with quality flags are left out: a flagged description of several
    is replaced by the next unflagged one of its image, an image without any is left out (and so
    are flagged single descriptions), counted in the result."""
    raw = _load_raw(path)
    files, base = _listed_files(image_folder)
    if isinstance(raw, dict):
        return _keyed_set(path, raw, (files, base, image_folder), drop_flagged)
    if not isinstance(raw, (list, tuple)):
        raise UserError(f"{path} holds a {type(raw).__name__}, not a list of description strings")
    raw = list(raw)
    if not raw:
        raise UserError(f"description file {path!r} holds no descriptions")
    _check_texts(path, raw, [f"#{i}" for i in range(len(raw))])
    if files is not None and len(files) != len(raw):
        raise UserError(f"{path} has {len(raw)} descriptions but {image_folder} has {len(files)} "
                        f"images; entry k must describe image k of the train folder")
    return DescriptionSet(texts=raw, files=files)


def _keyed_set(path, raw, folder, drop_flagged):
    """read_description_set of a path-keyed input; ``folder``: ``(files, base, image_folder)``."""
    files, base, image_folder = folder
    flagged_keys = getattr(raw, "flagged", set())
    per_image, flagged = 1, {}
    if any(isinstance(k, tuple) for k in raw):
        raw, flagged, per_image = _group_by_image(path, raw)
    else:
        flagged = {key: [0] for key in flagged_keys}
    keys = list(raw)
    if any(not isinstance(k, str) for k in keys):
        raise UserError(f"{path}: a path-keyed input needs string keys (image paths)")
    if per_image == 1:
        _check_texts(path, [raw[k] for k in keys], [repr(k) for k in keys])
    else:
        _check_texts(path, [t for k in keys for t in raw[k]],
                     [f"{k!r} #{j}" for k in keys for j in range(per_image)])
    if files is None:
        raise UserError(f"{path} maps image paths to descriptions; pass --data <train folder> "
                        f"so that rows can be written in ImageFolder order")
    normalised, canonical = _in_folder_order(path, raw, folder)
    flagged = {canonical_path(key, base): ks for key, ks in flagged.items()}
    found = DescriptionSet(texts=[normalised[c] for c in canonical], files=files, per_image=per_image,
                           flagged=sum(len(ks) for ks in flagged.values()))
    if drop_flagged and flagged:
        _drop_flagged(found, {f: flagged[c] for f, c in zip(files, canonical) if c in flagged})
    return found


def _in_folder_order(path, raw, folder):
    """``({canonical path: description}, canonical paths of the folder's files)``; two keys naming one
    image, an image without a description and a description of no image are UserErrors."""
    files, base, image_folder = folder
    normalised, original = {}, {}
    for key, text in raw.items():
        relative = canonical_path(key, base)
        if relative in normalised:
            raise UserError(f"{path}: {original[relative]!r} and {key!r} name the same image; keep one "
                            f"description per image")
        normalised[relative], original[relative] = text, key
    canonical = [canonical_path(f, base) for f in files]
    missing = [f for f, c in zip(files, canonical) if c not in normalised]
    extra = sorted(set(normalised) - set(canonical))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} images of {image_folder} have no description "
                         f"(first: {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} described paths are not in {image_folder} "
                         f"(first: {', '.join(extra[:3])})")
        raise UserError(f"{path}: " + "; ".join(parts) + "; paths must be relative to the train folder")
    return normalised, canonical


def _drop_flagged(found, flagged):
    """--drop-flagged on a DescriptionSet, in place (see read_description_set)."""
    texts, files = [], []
    for text, file in zip(found.texts, found.files):
        bad = flagged.get(file)
        if not bad:
            texts.append(text)
            files.append(file)
            continue
        good = [j for j in range(found.per_image) if j not in bad]
        if not good:
            found.left_out += 1
            continue
        texts.append([text[j] if j in good else text[next((g for g in good if g > j), good[0])]
                      for j in range(found.per_image)])
        found.replaced += len(bad)
        files.append(file)
    found.texts, found.files = texts, files
