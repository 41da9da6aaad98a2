"""One checkpoint format for both recipes, written atomically, and one way to load it."""
import os

import torch

from .errors import UserError
from .io import atomic_torch_save


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
        raise UserError(f"cannot read checkpoint {path!r} ({type(e).__name__}: {e}); "
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
