"""What a weights file holds, read the same way for --pretrained, --resume and evaluation: a run
folder stands for its checkpoint.pth, a DDP-saved (``module.``-prefixed) state dict is unwrapped,
and a file that is not weights of this model (a text-embedding table, another architecture, another
number of classes) is named in one line instead of a state-dict traceback."""
import os

import torch

from ..errors import UserError

CHECKPOINT = "checkpoint.pth"
CLASSIFIER_PREFIXES = ("fc.", "head.", "head_dist.", "classifier.")
RESAMPLED = ("pos_embed",)  # resampled to the input size by load_pretrained, never an architecture mismatch


def checkpoint_file(path: str) -> str:
    """``path`` itself, or the checkpoint.pth of a run folder; a folder without one is refused."""
    if os.path.isdir(path):
        inside = os.path.join(path, CHECKPOINT)
        if not os.path.isfile(inside):
            raise UserError(f"{path!r} is a folder without a {CHECKPOINT} (not a run folder, or its run saved none "
                            f"yet); pass a checkpoint file or the output folder of a run")
        from ..log import logger
        logger.info(f"{path} is a run folder: using its {CHECKPOINT}")
        return inside
    return path


def what_it_holds(obj) -> str:
    """A few words on a loaded object that is not a state dict."""
    if isinstance(obj, torch.Tensor):
        shape = "x".join(str(s) for s in obj.shape)
        kind = " (a text-embedding table, as description2embedding.py writes)" if obj.dim() == 2 else ""
        return f"a single {shape} tensor{kind}"
    if isinstance(obj, dict):
        return f"a dict without tensors (keys {list(obj)[:4]})"
    return f"a {type(obj).__name__}"


def state_dict_of(obj, path: str, flag: str) -> dict:
    """The model weights in ``obj`` (a state dict, our checkpoint's ``model``, a ``state_dict``
    entry), with a DDP ``module.`` prefix removed; anything else is a UserError naming what it is."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{flag} {path!r} holds {what_it_holds(obj)}, not model weights; pass a checkpoint of a "
                        f"run (checkpoint.pth, classifier.pth) or a torchvision/timm state dict")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def is_classifier(key: str) -> bool:
    return key.startswith(CLASSIFIER_PREFIXES)


def architecture_of(state: dict, model: torch.nn.Module) -> str | None:
    """The name of the architecture whose weights ``state`` are, among those of ``model``'s family
    (torchvision ResNets, or timm models sharing the first word of its name); None when none fits."""
    for name, build in _family(model):
        try:
            with torch.device("meta"):
                candidate = build(name).state_dict()
        except Exception:  # noqa: BLE001  a family member that cannot be built this way is not the answer
            continue
        if set(candidate) == set(state) and all(
                candidate[k].shape == state[k].shape for k in state if not is_classifier(k) and k not in RESAMPLED):
            return name
    return None


def model_name(model: torch.nn.Module) -> str:
    """This model's architecture name (timm records it; a torchvision one is recognised by its weights)."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    return name or architecture_of(model.state_dict(), model) or type(model).__name__


def _family(model):
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg and cfg.get("architecture"):
        import timm
        names = timm.list_models(cfg["architecture"].split("_")[0] + "*")[:60]
        return [(n, lambda n: timm.create_model(n, pretrained=False)) for n in names]
    import torchvision
    if isinstance(model, torchvision.models.ResNet):
        names = [n for n in torchvision.models.list_models(module=torchvision.models)
                 if n.startswith(("resnet", "resnext", "wide_resnet"))]
        return [(n, lambda n: torchvision.models.get_model(n)) for n in names]
    return []


def check_fits(model: torch.nn.Module, state: dict, path: str, flag: str, recorded_arch: str | None = None) -> list:
    """Refuse ``state`` for ``model`` in one line: another number of classes (naming both counts) or
    another architecture (naming both). Returns the classifier keys whose class count differs (for
    --pretrained, which drops them) when everything else fits."""
    own = model.state_dict()
    differing = [k for k in state if k in own and state[k].shape != own[k].shape and k not in RESAMPLED]
    body = [k for k in differing if not is_classifier(k)]
    unknown = [k for k in state if k not in own]
    if body or len(unknown) > len(own) // 2 or sum(k not in state for k in own) > len(own) // 2:
        theirs = recorded_arch or architecture_of(state, model) or "another architecture"
        first = (f"{body[0]} is {tuple(state[body[0]].shape)} there, {tuple(own[body[0]].shape)} here" if body else
                 f"first of its tensors this model lacks: {unknown[0]}" if unknown else "most of this model's "
                 "tensors are missing from it")
        raise UserError(f"{flag} {path!r} holds weights of {theirs}, not of {model_name(model)} ({first}); pass the "
                        f"architecture it was trained with (-a / --model), or weights of this one")
    return [k for k in differing if is_classifier(k)]


def class_count_error(model: torch.nn.Module, state: dict, path: str, flag: str, where: str) -> UserError:
    """The UserError for a checkpoint that classifies another number of classes than this run."""
    own = model.state_dict()
    key = next(k for k in state if is_classifier(k) and k in own and state[k].shape != own[k].shape)
    return UserError(f"{flag} {path!r} classifies {state[key].shape[0]} classes but this run has {own[key].shape[0]} "
                     f"({where}); use the data it was trained on, or start a new run (--pretrained takes weights of "
                     f"another class count)")
