"""-e / --eval: evaluate one checkpoint (ours, or a plain torchvision/timm state dict) and train nothing."""
from dataclasses import dataclass
from collections.abc import Callable

import torch

from ..errors import UserError
from ..log import logger
from .checkpoint import load_checkpoint, load_classifier_weights
from .evaluate import evaluate
from .eval_sets import summary as eval_sets_summary


@dataclass(kw_only=True)
class Evaluation:
    """How a recipe evaluates: on which device, under which autocast, with which input preparation,
    and the --eval-set sets (``recipe``: its name, to refuse the other recipe's checkpoints)."""
    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    prepare: Callable | None = None
    recipe: str | None = None
    eval_sets: object = None

    def run(self, model: torch.nn.Module, loader, prefix: str = "") -> tuple:
        """(validation stats, --eval-set results) of ``model``."""
        stats = evaluate(model, loader, self.device, self.amp_dtype, self.channels_last, self.prepare)
        sets = self.eval_sets.evaluate(model, self.device, self.amp_dtype, self.channels_last, self.prepare,
                                       prefix) if self.eval_sets else {}
        return stats, sets


def adopt_checkpoint_settings(config, parser, keys: list, recipe: str):
    """-e / --eval of one of our checkpoints: the model settings ``keys`` it was trained with (model,
    input size, classes) replace the defaults in ``config``; a flag given with another value is an
    error naming both. Returns the loaded checkpoint (or plain state dict)."""
    state = load_checkpoint(config.resume)
    saved = state.get("args") if isinstance(state, dict) and state.get("recipe") in (None, recipe) else None
    if not isinstance(saved, dict):
        return state
    taken = []
    for key in keys:
        if key not in saved or getattr(config, key) == saved[key]:
            continue
        if getattr(config, key) != parser.get_default(key):
            raise UserError(f"--{key.replace('_', '-')} {getattr(config, key)} contradicts {config.resume!r}, which "
                            f"was trained with {saved[key]}; leave the flag out to evaluate the checkpoint as trained")
        setattr(config, key, saved[key])
        taken.append(f"{key} {saved[key]}")
    if taken:
        logger.info(f"evaluation settings from {config.resume}: {', '.join(taken)}")
    return state


def evaluate_checkpoint(model: torch.nn.Module, state, path: str, loader, how: Evaluation) -> dict:
    """Our checkpoint (its raw weights, and its EMA when it has one), or a plain torchvision/timm state
    dict, over the validation set (and the --eval-set sets: ``stats["sets"]``)."""
    load_classifier_weights(model.backbone, state, path, how.recipe)
    ema = state.get("model_ema") if isinstance(state, dict) else None
    which = " (raw weights)" if ema else ""
    stats, sets = how.run(model, loader)
    logger.info(f"evaluation of {path}{which}: top-1 {stats['acc1']:.3f}% top-5 {stats['acc5']:.3f}% "
                f"loss {stats['loss']:.4f} over {stats['num_images']} images")
    if ema:
        model.backbone.load_state_dict({k[len("backbone."):]: v for k, v in ema.items() if k.startswith("backbone.")})
        stats["ema"], ema_sets = how.run(model, loader, "ema_")
        logger.info(f"evaluation of {path} (EMA weights): top-1 {stats['ema']['acc1']:.3f}% "
                    f"top-5 {stats['ema']['acc5']:.3f}% over {stats['ema']['num_images']} images")
        sets.update(ema_sets)
    if sets:
        stats["sets"] = sets
        logger.info(f"eval sets of {path}: {eval_sets_summary(sets)}")
    return stats
