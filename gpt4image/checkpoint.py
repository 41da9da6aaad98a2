"""The one checkpoint format of both recipes: written atomically, read back, checked, resumed from."""
import os

import torch

from .distributed import logger
from .errors import UserError
from .io import atomic_torch_save, load_error

CHECKPOINT = "checkpoint.pth"


def save_checkpoint(state, path, is_main=True):
    """Write ``state`` (a dict of tensors / plain values) to ``path`` on the main rank only; a kill at
    any moment leaves either the previous file or the new one."""
    if is_main:
        atomic_torch_save(state, path)


def load_checkpoint(path):
    """Read a checkpoint written by ``save_checkpoint`` (or a plain state dict) onto the CPU."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path!r} ({load_error(e)}); "
                        f"it is not a file written by torch.save") from None


def check_compatible(checkpoint, path, recipe, arch, text_dim):
    """Refuse a checkpoint of the other recipe, another architecture or another embedding width."""
    if not isinstance(checkpoint, dict) or "recipe" not in checkpoint:
        return
    if checkpoint["recipe"] != recipe:
        raise UserError(f"checkpoint {path!r} was written by the {checkpoint['recipe']} recipe, not {recipe}; "
                        f"resume it with {checkpoint['recipe']}/main.py")
    if checkpoint.get("arch") != arch:
        raise UserError(f"checkpoint {path!r} holds a {checkpoint.get('arch')} model, not {arch}; "
                        f"pass the same model name or another checkpoint")
    saved_dim = checkpoint.get("text_dim")
    if saved_dim != text_dim:
        raise UserError(f"checkpoint {path!r} has a projection head for {saved_dim}-d text embeddings but "
                        f"--text_emb gives {text_dim}-d; use the table the run started with")


def training_state(recipe, epoch, best, args, **position):
    """The checkpoint of ``recipe`` (a ``training.Recipe``) after ``epoch``; ``position`` (step_in_epoch,
    partial) marks a checkpoint taken inside the epoch."""
    model, ema, scaler = recipe.model, recipe.ema, recipe.scaler
    return {"recipe": recipe.name, "arch": recipe.arch, "text_dim": recipe.text_dim, "epoch": epoch, "best": best,
            "model": model.backbone.state_dict(),
            "projection_head": model.projection_head.state_dict() if model.projection_head is not None else None,
            "model_ema": ema.module.state_dict() if ema is not None else None,
            "optimizer": recipe.optimizer.state_dict(), "scheduler": recipe.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "args": vars(args), **position}


def find_resume(resume, output_dir):
    """Checkpoint to resume from: ``--resume PATH``, else ``<output_dir>/checkpoint.pth`` if present."""
    if resume:
        return resume
    path = os.path.join(output_dir, CHECKPOINT)
    return path if os.path.isfile(path) else None


def resume_position(checkpoint):
    """(epoch to start, step inside it, partial sums) from a checkpoint; mid-epoch after a stop."""
    if checkpoint.get("step_in_epoch"):
        return checkpoint["epoch"], checkpoint["step_in_epoch"], checkpoint.get("partial")
    return checkpoint["epoch"] + 1, 0, None


def _check_resumable(checkpoint, path, epochs):
    """A training checkpoint of a run with the same number of epochs (the schedule depends on it)."""
    if not isinstance(checkpoint, dict) or not {"model", "optimizer", "epoch"} <= set(checkpoint):
        raise UserError(f"{path!r} is not a training checkpoint: it holds only weights (like classifier.pth), not "
                        f"the optimizer state and position a run continues from; evaluate it with -e/--eval "
                        f"--resume, or resume from the run's {CHECKPOINT}")
    saved = (checkpoint.get("args") or {}).get("epochs")
    if saved is not None and saved != epochs:
        raise UserError(f"{path!r} belongs to a run of {saved} epochs but --epochs is {epochs}; the learning-rate "
                        f"schedule spans the whole run, so pass --epochs {saved} to continue it, or start a new "
                        f"run of {epochs} epochs in another output folder")


def restore(recipe, path, epochs):
    """Load the checkpoint at ``path`` into ``recipe``'s model, EMA, optimizer, scheduler and scaler.

    Returns (start epoch, step inside it, partial epoch sums, best, the training metrics of an epoch
    whose evaluation had not finished, or None)."""
    checkpoint = load_checkpoint(path)
    _check_resumable(checkpoint, path, epochs)
    check_compatible(checkpoint, path, recipe.name, recipe.arch, recipe.text_dim)
    model = recipe.model
    model.backbone.load_state_dict(checkpoint["model"])
    if model.projection_head is not None and checkpoint.get("projection_head"):
        model.projection_head.load_state_dict(checkpoint["projection_head"])
    if recipe.ema is not None and checkpoint.get("model_ema"):
        recipe.ema.module.load_state_dict(checkpoint["model_ema"])
    recipe.optimizer.load_state_dict(checkpoint["optimizer"])
    recipe.scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint.get("scaler"):
        recipe.scaler.load_state_dict(checkpoint["scaler"])
    epoch, step, partial = resume_position(checkpoint)
    logger.info(f"resuming from {path}: continuing at epoch {epoch}, step {step}")
    return epoch, step, partial, checkpoint.get("best"), checkpoint.get("unevaluated")


def load_classifier_weights(backbone, state, path, recipe=None):
    """Load a plain torchvision/timm state dict, or our checkpoint's ``model`` entry, into ``backbone``."""
    if recipe and isinstance(state, dict) and state.get("recipe") not in (None, recipe):
        raise UserError(f"{path!r} is a checkpoint of the {state['recipe']} recipe ({state.get('arch')}), not of "
                        f"{recipe}; evaluate it with {state['recipe']}/main.py")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        backbone.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"checkpoint {path!r} does not fit this model ({first}); pass the same architecture") from None
