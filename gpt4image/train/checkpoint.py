"""The one checkpoint format of both recipes: written atomically, read back, checked, resumed from."""
import os

import torch

from ..log import logger
from ..errors import UserError
from ..io import atomic_torch_save, load_error
from .checkpoints import Progress, no_best
from .run_checks import note_unfingerprinted
from .state_dicts import CHECKPOINT, check_fits, checkpoint_file, class_count_error, state_dict_of, what_it_holds
from .text_targets import fixed_on_resume


def save_checkpoint(state: dict, path: str, is_main: bool = True) -> None:
    """Write ``state`` (a dict of tensors / plain values) to ``path`` on the main rank only; a kill at
    any moment leaves either the previous file or the new one."""
    if is_main:
        atomic_torch_save(state, path)


def load_checkpoint(path: str):
    """Read a checkpoint written by ``save_checkpoint`` (or a plain state dict) onto the CPU; a run
    folder stands for its checkpoint.pth."""
    path = checkpoint_file(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path!r}: {load_error(e, path)}") from None


def check_compatible(checkpoint, path: str, recipe: str, arch: str, text_dim: int | None) -> None:
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
        saved = (f"a projection head for {saved_dim}-d text embeddings" if saved_dim
                 else "no text alignment (a baseline)")
        given = f"--text_emb gives {text_dim}-d embeddings" if text_dim else "--text_emb none asks for a baseline"
        raise UserError(f"checkpoint {path!r} has {saved} but {given}; use the --text_emb the run started with, "
                        f"or another output folder for a new run")


def training_state(trainer, epoch: int, **position) -> dict:
    """The checkpoint of ``trainer`` (a ``Trainer``) after ``epoch``; ``position`` (step_in_epoch,
    partial; unevaluated: the epoch's training metrics, before its evaluation) marks where it stands."""
    model, ema, scaler = trainer.model, trainer.ema, trainer.scaler
    return {"recipe": trainer.name, "arch": trainer.arch, "text_dim": trainer.text_dim, "epoch": epoch,
            "best": dict(trainer.progress.best), "model": model.backbone.state_dict(),
            "projection_head": model.projection_head.state_dict() if model.projection_head is not None else None,
            "model_ema": ema.module.state_dict() if ema is not None else None,
            "alignment_state": _alignment_state(model).state_dict() if _alignment_state(model) is not None else None,
            "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "args": trainer.config.recorded(),
            "classes": trainer.classes, **position}


def _alignment_state(model):
    return getattr(model, "alignment_state", None)


def find_resume(resume: str, output_dir: str) -> str | None:
    """Checkpoint to resume from: ``--resume PATH``, else ``<output_dir>/checkpoint.pth`` if present."""
    if resume:
        return resume
    path = os.path.join(output_dir, CHECKPOINT)
    return path if os.path.isfile(path) else None


def resume_position(checkpoint: dict) -> tuple:
    """(epoch to start, step inside it, partial sums) from a checkpoint; mid-epoch after a stop."""
    if checkpoint.get("step_in_epoch"):
        return checkpoint["epoch"], checkpoint["step_in_epoch"], checkpoint.get("partial")
    return checkpoint["epoch"] + 1, 0, None


def _check_resumable(checkpoint, path, epochs):
    """A training checkpoint of a run with the same number of epochs (the schedule depends on it)."""
    if not isinstance(checkpoint, dict) or not any(isinstance(v, (dict, torch.Tensor)) for v in checkpoint.values()):
        raise UserError(f"{path!r} holds {what_it_holds(checkpoint)}, not a training checkpoint; resume from a run's "
                        f"{CHECKPOINT} (or its output folder)")
    if not {"model", "optimizer", "epoch"} <= set(checkpoint):
        raise UserError(f"{path!r} is not a training checkpoint: it holds only weights (like classifier.pth), not "
                        f"the optimizer state and position a run continues from; evaluate it with -e/--eval "
                        f"--resume, or resume from the run's {CHECKPOINT}")
    saved = (checkpoint.get("args") or {}).get("epochs")
    if saved is not None and saved != epochs:
        raise UserError(f"{path!r} belongs to a run of {saved} epochs but --epochs is {epochs}; the learning-rate "
                        f"schedule spans the whole run, so pass --epochs {saved} to continue it, or start a new "
                        f"run of {epochs} epochs in another output folder")


# arguments that do not change what a run trains: where it reads and writes, how fast, how it reports
OPERATIONAL = {"data", "data_path", "save_dir", "output_dir", "resume", "workers", "num_workers", "print_freq",
               "device", "stop_after", "checkpoint_every_minutes", "requeue", "stall_timeout", "local_rank",
               "start_epoch", "evaluate", "eval", "compile", "skip_corrupt_images", "pin_mem", "dist_eval", "text_emb",
               "config", "wandb_project", "wandb_mode", "channels_last", "val_text_emb"}
OPERATIONAL |= {"eval_set", "eval_sets_every_epoch"}  # extra evaluation only
OPERATIONAL |= {"nonfinite"}  # what to do if a step goes non-finite: a rerun may choose to skip


def run_differences(saved_args: dict, args) -> list:
    """The run-defining arguments (not in OPERATIONAL) whose values differ: [(name, saved, now)];
    ``args``: a config (or parsed arguments)."""
    now = vars(args)
    return [(k, saved_args[k], now[k]) for k in sorted(now) if k in saved_args and k not in OPERATIONAL
            and saved_args[k] != now[k]]


def check_same_run(checkpoint: dict, path: str, args, explicit: bool) -> None:
    """Resume automatically only a run of the same arguments; ``explicit`` (--resume given) continues
    anyway and says what changed."""
    changed = run_differences(checkpoint.get("args") or {}, args)
    if not changed:
        return
    fixed = [(k, old, new) for k, old, new in changed if k in fixed_on_resume(checkpoint.get("args") or {})]
    if fixed:
        k, old, new = fixed[0]
        raise UserError(f"{path!r} was trained with --{k.replace('_', '-')} {old!r}, not {new!r}: the labels and text "
                        f"targets of a run never change; pass {old!r} to continue it, or use another output folder")
    listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changed[:8])
    if explicit:
        logger.warning(f"--resume {path}: continuing although arguments differ from the checkpoint's: {listed}")
        return
    raise UserError(f"{path!r} belongs to a run with other arguments ({listed}); use another output folder for a new "
                    f"run, or pass --resume {path} to continue that run with these arguments anyway")


def restore(trainer, path: str, explicit: bool = False) -> Progress:
    """Load the checkpoint at ``path`` into ``trainer``'s model, EMA, optimizer, scheduler and scaler,
    after checking that it continues this run; returns where the run stands."""
    checkpoint = load_checkpoint(path)
    _check_resumable(checkpoint, path, trainer.config.epochs)
    check_compatible(checkpoint, path, trainer.name, trainer.arch, trainer.text_dim)
    check_same_run(checkpoint, path, trainer.config, explicit)
    note_unfingerprinted(checkpoint.get("args"), path, trainer.config)
    _load_model(trainer.model, checkpoint, path)
    if trainer.ema is not None and checkpoint.get("model_ema"):
        trainer.ema.module.load_state_dict(checkpoint["model_ema"])
    trainer.optimizer.load_state_dict(checkpoint["optimizer"])
    trainer.scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint.get("scaler"):
        trainer.scaler.load_state_dict(checkpoint["scaler"])
    epoch, step, partial = resume_position(checkpoint)
    logger.info(f"resuming from {path}: continuing at epoch {epoch}, step {step}")
    return Progress(epoch=epoch, step=step, partial=partial, unevaluated=checkpoint.get("unevaluated"),
                    best={**no_best(), **(checkpoint.get("best") or {})})


def _load_model(model, checkpoint, path):
    """The backbone, projection head and alignment-loss state of a TextAlignedModel."""
    if check_fits(model.backbone, checkpoint["model"], path, "--resume", checkpoint.get("arch")):
        raise class_count_error(model.backbone, checkpoint["model"], path, "--resume",
                                "the classes of the train folder, or --num-classes / --nb-classes")
    model.backbone.load_state_dict(checkpoint["model"])
    if model.projection_head is not None and checkpoint.get("projection_head"):
        model.projection_head.load_state_dict(checkpoint["projection_head"])
    state = _alignment_state(model)
    if state is not None:  # SigLIP's learned scalars, the text statistics of --text-emb-standardize
        if not checkpoint.get("alignment_state"):
            raise UserError(f"checkpoint {path!r} has no alignment-loss state (SigLIP's temperature and bias, "
                            f"--text-emb-standardize's statistics), which this run's --loss_type or "
                            f"--text-emb-standardize keep; resume it with the alignment flags it was trained with")
        state.load_state_dict(checkpoint["alignment_state"])


def load_pretrained(backbone: torch.nn.Module, path: str) -> None:
    """Initialise ``backbone`` from weights on disk (a torchvision/timm state dict, a .safetensors file
    such as those in timm's Hugging Face cache, or our checkpoint): the classifier is dropped when its
    class count differs (as DeiT's --finetune does) and a ViT's position embedding is resampled to
    this input size. Refuses weights that leave most of the model uninitialised."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            state = load_file(path)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot read {path!r} ({type(e).__name__}: {e})") from None
    else:
        state = load_checkpoint(path)
    recorded_arch = state.get("arch") if isinstance(state, dict) else None
    state = state_dict_of(state, path, "--pretrained")
    own = backbone.state_dict()
    classifier = check_fits(backbone, state, path, "--pretrained", recorded_arch)
    if classifier:
        logger.info(f"pretrained: {path} classifies {state[classifier[0]].shape[0]} classes, this model "
                    f"{own[classifier[0]].shape[0]}: dropping its classifier ({', '.join(classifier)})")
        for key in classifier:
            del state[key]
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(backbone.patch_embed.grid_size),
                                                    num_prefix_tokens=backbone.num_prefix_tokens)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if len(missing) > len(own) // 2:
        raise UserError(f"{path!r} initialises only {len(own) - len(missing)} of {len(own)} tensors of this model "
                        f"(first missing: {missing[0]}); it is not a checkpoint of this architecture")
    logger.info(f"initialised from {path}: {len(own) - len(missing)} of {len(own)} tensors"
                + (f", {len(unexpected)} of the file's not used" if unexpected else ""))


def cached_torchvision_weights(arch: str) -> str:
    """The file of torchvision's default weights for ``arch`` in torch hub's cache (never downloaded)."""
    import torch.hub
    import torchvision
    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.isfile(path):
        raise UserError(f"--pretrained cache: torchvision's {arch} weights are not in {os.path.dirname(path)}; "
                        f"download {url} there (or pass --pretrained PATH)")
    return path


def cached_timm_weights(backbone: torch.nn.Module, name: str) -> str:
    """The file of timm's pretrained weights of ``backbone`` in the Hugging Face cache (never downloaded)."""
    from huggingface_hub import try_to_load_from_cache
    repo = (getattr(backbone, "pretrained_cfg", None) or {}).get("hf_hub_id")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename) if repo else None
        if isinstance(path, str) and os.path.isfile(path):
            return path
    raise UserError(f"--pretrained cache: timm's weights of {name} ({repo or 'no Hugging Face id'}) are not in the "
                    f"Hugging Face cache; fetch them once where there is a network "
                    f"(timm.create_model({name!r}, pretrained=True)) or pass --pretrained PATH")


def load_classifier_weights(backbone: torch.nn.Module, state, path: str, recipe: str | None = None,
                            flag: str = "--resume") -> None:
    """Load a plain torchvision/timm state dict, or our checkpoint's ``model`` entry, into ``backbone``
    (``flag``: the option that named the file, for messages)."""
    if recipe and isinstance(state, dict) and state.get("recipe") not in (None, recipe):
        raise UserError(f"{path!r} is a checkpoint of the {state['recipe']} recipe ({state.get('arch')}), not of "
                        f"{recipe}; evaluate it with {state['recipe']}/main.py")
    recorded_arch = state.get("arch") if isinstance(state, dict) else None
    state = state_dict_of(state, path, flag)
    if check_fits(backbone, state, path, flag, recorded_arch):
        raise class_count_error(backbone, state, path, flag, "the classes of the validation folder, or "
                                "--num-classes / --nb-classes; evaluate it on data with the classes it was trained on")
    try:
        backbone.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"checkpoint {path!r} does not fit this model ({first[:200]}); it was trained with another "
                        f"architecture: pass that one (-a / --model)") from None
