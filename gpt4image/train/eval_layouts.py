"""How an --eval-set is read: the layouts it is recognised as, and the map from its classes to the
model's outputs (``recognise``; eval_sets.py builds and scores the sets).

The class mapping always comes from the run's class list (the checkpoint's, else the training
folder's names): a folder is never assumed to be in the model's output order.
- class folders named after training classes (ImageNet-Sketch, -R, -A, any subset): by name; when
  they are a proper subset, the logits are restricted to those classes before the argmax (the
  200-class protocol of ImageNet-R and -A);
- class folders named ``0`` .. ``999`` (ImageNet-V2): the index into ImageNet-1k's sorted wnids;
- ReaL: ``real.json``, one label list per validation image; list i belongs to the image whose file
  name carries number i + 1 (``ILSVRC2012_val_000000NN.JPEG``); images with an empty list are left
  out; a prediction is right when it is in the image's list. A ``real.json`` file scores the run's
  own validation folder; a folder holding ``real.json`` scores the images in it (flat, as the
  validation archive unpacks, or in class folders).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from collections.abc import Callable

import torch
from torch import Tensor

from .data import load_image
from ..errors import UserError
from ..io import refuse_repeated_dirs

VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})")
REAL_JSON = "real.json"


@dataclass(kw_only=True)
class EvalSet:
    """One --eval-set: its images, how they map to the model's outputs, and its loader."""
    name: str
    kind: str  # the layout it was recognised as, for the log
    dataset: object
    restrict: list | None = None  # model outputs the logits are restricted to (folder order); None: all
    top5: bool = True
    loader: object = None


class _TargetMap:
    """Folder target -> model output index (a class, not a lambda: loader workers may be spawned)."""

    def __init__(self, table):
        self.table = table

    def __call__(self, target):
        return self.table[target]




class LabelSets(torch.utils.data.Dataset):
    """(image, label distribution over the model's classes): the image's labels share its weight 1,
    so a prediction scores when it is any of them (evaluate.evaluate's rule for 2-d targets)."""

    def __init__(self, paths: list[str], labels: list[list[int]], num_classes: int, transform: Callable | None) -> None:
        self.paths, self.labels, self.num_classes, self.transform = paths, labels, num_classes, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[object, Tensor]:
        image = load_image(self.paths[index])
        target = torch.zeros(self.num_classes)
        target[self.labels[index]] = 1.0 / len(self.labels[index])
        return (self.transform(image) if self.transform is not None else image), target



def recognise(name: str, path: str, classes: list[str], val_set: object) -> EvalSet:
    """The EvalSet of ``path`` (a folder, or a ReaL real.json scoring ``val_set``), checked against
    the run's ``classes``; its images use ``val_set``'s transform."""
    what = f"--eval-set {name}={path}"
    transform = getattr(val_set, "transform", None)
    if os.path.isfile(path) and path.endswith(".json"):
        images = getattr(val_set, "samples", None)
        if images is None:
            raise UserError(f"{what}: a ReaL real.json scores the run's validation folder, but this run has none "
                            f"(generated data or CIFAR); pass --data / --data-path with val/, or give a folder "
                            f"holding real.json and the validation images")
        return _real(name, path, [p for p, _ in images], classes, transform, "the validation folder")
    if not os.path.isdir(path):
        state = "is a file" if os.path.exists(path) else "does not exist"
        raise UserError(f"{what}: {path!r} {state}; PATH must be a folder of class folders or a ReaL real.json")
    refuse_repeated_dirs(path)
    if os.path.isfile(os.path.join(path, REAL_JSON)):
        return _real(name, os.path.join(path, REAL_JSON), _files_below(path), classes, transform, path)
    folders = sorted(e.name for e in os.scandir(path) if e.is_dir())
    if not folders:
        raise UserError(f"{what}: {path!r} has no class folders (nor a {REAL_JSON}); lay the set out as one folder "
                        f"per class (README: 'Evaluation sets')")
    position = {c: i for i, c in enumerate(classes)}
    if all(f in position for f in folders):
        return _class_folders(name, path, position, classes, transform)
    if all(f.isdigit() and str(int(f)) == f and int(f) < 1000 for f in folders):
        to_model = imagenet_index_map(classes)
        unknown = [f for f in folders if to_model(int(f)) is None]
        if unknown:
            raise UserError(f"{what}: its folders are ImageNet-V2's class indices, but {len(unknown)} of the classes "
                            f"they stand for are not among the run's {len(classes)} training classes (first: "
                            f"{', '.join(_imagenet_names(unknown[:3]))}); evaluate a model trained on ImageNet-1k")
        dataset = _image_folder(path, transform)
        dataset.target_transform = _TargetMap([to_model(int(f)) for f in dataset.classes])
        return EvalSet(name=name, kind=f"ImageNet-V2 layout (folder k is ImageNet class k), {len(folders)} classes",
                       dataset=dataset, top5=len(classes) >= 5)
    unknown = [f for f in folders if f not in position]
    raise UserError(f"{what}: {len(unknown)} of its {len(folders)} class folders are not among the run's "
                    f"{len(classes)} training classes (first: {', '.join(unknown[:3])}); a set's folders must be "
                    f"named as the training class folders (wnids for ImageNet) or 0..999 (ImageNet-V2)")


def _image_folder(path, transform):
    import torchvision
    try:
        return torchvision.datasets.ImageFolder(path, transform, loader=load_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"cannot read the image folders under {path!r}: {e}") from None


def _class_folders(name, path, position, classes, transform):
    """Folders named after training classes: all of them -> plain argmax; a subset -> restricted."""
    dataset = _image_folder(path, transform)
    folders = dataset.classes
    indices = [position[f] for f in folders]
    if len(folders) == len(classes):
        dataset.target_transform = _TargetMap(indices)
        return EvalSet(name=name, kind=f"class folders of all {len(classes)} training classes", dataset=dataset,
                       top5=len(classes) >= 5)
    protocol = " (the ImageNet-R/-A protocol)" if len(folders) == 200 else ""
    return EvalSet(name=name, kind=f"{len(folders)} of the {len(classes)} training classes, logits restricted to "
                                  f"them{protocol}", dataset=dataset, restrict=indices, top5=len(folders) >= 5)


def _imagenet_wnids():
    from timm.data import ImageNetInfo  # timm ships ImageNet-1k's 1000 wnids, sorted
    return ImageNetInfo().label_names()


def _imagenet_names(indices):
    wnids = _imagenet_wnids()
    return [f"{wnids[i]} (index {i})" if 0 <= i < len(wnids) else f"index {i}" for i in map(int, indices)]


def imagenet_index_map(classes: list[str]) -> Callable[[int], int | None]:
    """ImageNet-1k class index k (into the 1000 sorted wnids, as ImageNet-V2's folder names and ReaL's
    labels give it) -> index into ``classes``: by wnid, or by the name ``str(k)`` when the training
    folders are named by index; None when the run has no such class."""
    wnids = _imagenet_wnids()
    position = {c: i for i, c in enumerate(classes)}

    def to_model(k: int) -> int | None:
        return position.get(wnids[k], position.get(str(k))) if 0 <= k < len(wnids) else None
    return to_model


def _files_below(folder):
    """Image files below ``folder`` (flat or in class folders), sorted."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if VAL_NUMBER.search(f)]
    return found


def _real(name, json_path, paths, classes, transform, where):
    """ReaL: ``json_path``'s label lists for the images ``paths`` by the number in their file names."""
    what = f"--eval-set {name}={json_path}"
    try:
        with open(json_path, encoding="utf-8") as f:
            labels = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: cannot read it as JSON ({e})") from None
    if not isinstance(labels, list) or not all(isinstance(x, list) and all(isinstance(k, int) for k in x)
                                               for x in labels):
        raise UserError(f"{what}: not ReaL's real.json (a JSON list with one list of class indices per "
                        f"validation image)")
    if len(labels) != len(paths):
        raise UserError(f"{what} has {len(labels)} label lists but {where} has {len(paths)} validation images; "
                        f"ReaL's real.json has one list per ImageNet validation image (50,000), so give it the "
                        f"whole validation set")
    numbers = {}
    for p in paths:
        match = VAL_NUMBER.search(os.path.basename(p))
        number = int(match.group(1)) if match else None
        if number is None or not 1 <= number <= len(labels):
            raise UserError(f"{what}: {p!r} does not carry a validation image number 1..{len(labels)} in its name "
                            f"(ILSVRC2012_val_000000NN.JPEG); ReaL finds each image's labels by that number")
        if number in numbers:
            raise UserError(f"{what}: {p!r} and {numbers[number]!r} carry the same number {number}")
        numbers[number] = p
    to_model = imagenet_index_map(classes)
    unknown = sorted({k for x in labels for k in x if to_model(k) is None})
    if unknown:
        raise UserError(f"{what}: {len(unknown)} of its labels are not among the run's {len(classes)} training "
                        f"classes (first: {', '.join(_imagenet_names(unknown[:3]))}); "
                        f"ReaL scores a model trained on ImageNet-1k")
    kept = [(numbers[i + 1], [to_model(k) for k in x]) for i, x in enumerate(labels) if x]
    dataset = LabelSets([p for p, _ in kept], [x for _, x in kept], len(classes), transform)
    return EvalSet(name=name, kind=f"ReaL labels of {where} ({len(labels) - len(kept)} images without a label left "
                                  f"out; right when the prediction is any of an image's labels)", dataset=dataset,
                   top5=False)
