"""The training loop of both recipes: resume, train, evaluate, checkpoint, log, export, stop.

A recipe (resnet/main.py, deit/main.py) builds its model, optimizer, scheduler, criterion and loaders
and hands them to ``fit`` as a ``Recipe``; everything that happens between epochs is here, once.
"""
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .checkpoint import (CHECKPOINT, find_resume, load_checkpoint, load_classifier_weights, restore, save_checkpoint,
                         training_state)
from .data import SkipCorrupt
from .distributed import cleanup, heartbeat, init_distributed, start_watchdog, stop_watchdog
from ..log import logger, setup_logging
from .epoch import EpochControl, EpochStart, NonFiniteLoss, Reporting, train_one_epoch
from .evaluate import evaluate
from .step import TrainStep
from ..errors import UserError, exit_on_user_error
from .eval_sets import sets_in, summary as eval_sets_summary
from ..io import atomic_torch_save
from .alignment import Alignment
from .resumable import PREEMPTED_EXIT_CODE, RunControl
from .run_checks import check_accumulation
from .run_record import RunLock, RunRecord, epoch_row, read_log
from .text_targets import write_train_labels


@dataclass
class Recipe:
    """What differs between the recipes. ``model`` is the TextAlignedModel (not wrapped);
    ``step_scheduler(epochs_done)`` positions the scheduler for the next epoch (called after every
    epoch and once after a resume, so it must be idempotent); ``criterion(images, logits, targets)``."""
    name: str
    arch: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    step_scheduler: Callable[[int], None]
    criterion: Callable
    scaler: torch.amp.GradScaler
    text_dim: Optional[int] = None
    train_prepare: Optional[Callable] = None
    eval_prepare: Optional[Callable] = None
    mix_fn: Optional[Callable] = None
    ema: object = None
    ema_device: Optional[torch.device] = None
    clip_grad: Optional[float] = None
    sync_bn: bool = False
    channels_last: bool = False
    best_name: str = "best_checkpoint.pth"
    classifier_hint: str = ""
    classes: Optional[list] = None  # class names in output order, kept in the checkpoint (eval sets map by them)
    log_extra: dict = field(default_factory=dict)


@dataclass
class Data:
    """The training set (for its size and skipped-image count), its resumable loader and sampler, and
    the exact validation loader."""
    train_set: object
    train_loader: object
    sampler: object
    val_loader: object
    eval_sets: object = None  # eval_sets.EvalSets of --eval-set


@dataclass
class RunOptions:
    """The command-line settings of the loop (``args`` is written to args.json and the checkpoint)."""
    args: object
    output_dir: str
    epochs: int
    batch_size: int
    seed: int = 0
    print_freq: int = 10
    resume: str = ""
    start_epoch: int = 0
    stop_after: Optional[int] = None
    checkpoint_every_minutes: float = 30.0
    requeue: bool = False
    stall_timeout: float = 300.0
    accum_iter: int = 1
    amp_dtype: Optional[torch.dtype] = None
    alignment: Optional[Alignment] = None
    compile: bool = False
    lr_note: str = ""  # how the lr came about (scaled or as given), for the start line


@dataclass
class Progress:
    epoch: int = 0
    step: int = 0
    partial: Optional[list] = None
    unevaluated: Optional[dict] = None  # training metrics of epoch - 1, saved before its evaluation
    best: dict = field(default_factory=lambda: {"acc1": -1.0, "epoch": -1, "ema_acc1": -1.0, "ema_epoch": -1})


def fit(recipe, data, opts, dist_info):
    """Train ``recipe`` from its output folder's checkpoint (or from scratch) to ``opts.epochs``.

    Returns {"best", "final_acc1", "final_ema_acc1", "stopped"}; ``stopped`` is the signal's name
    when a stop request ended the run early (its checkpoint then holds the position)."""
    with RunLock(opts.output_dir, dist_info.is_main):
        progress = _resume(recipe, opts)
        if progress.epoch >= opts.epochs and progress.unevaluated is None:
            return _already_finished(recipe, opts, progress)
        accum_note = _check_batches(data, opts, dist_info)
        record = RunRecord(opts.output_dir, opts.args, dist_info.is_main, recipe.name)  # every check has passed
        write_train_labels(data.train_set, opts.output_dir, dist_info.is_main)
        if progress.epoch or progress.step:
            record.truncate_after(progress.epoch)
        start_watchdog(dist_info.rank, dist_info.world_size, opts.stall_timeout)
        try:
            return _fit(recipe, data, opts, dist_info, progress, record, accum_note)
        finally:
            stop_watchdog()
            record.close()


def _fit(recipe, data, opts, dist_info, progress, record, accum_note=""):
    recipe.step_scheduler(progress.epoch)
    train_model, recipe.model = wrap_distributed(recipe.model, dist_info, recipe.sync_bn)
    step = TrainStep(model=torch.compile(train_model) if opts.compile else train_model, optimizer=recipe.optimizer,
                     criterion=recipe.criterion, device=dist_info.device, alignment=opts.alignment,
                     amp_dtype=opts.amp_dtype, scaler=recipe.scaler, mix_fn=recipe.mix_fn, ema=recipe.ema,
                     clip_grad=recipe.clip_grad, prepare=recipe.train_prepare, channels_last=recipe.channels_last,
                     accum_iter=opts.accum_iter, nonfinite=getattr(opts.args, "nonfinite", "stop"))
    control = RunControl(dist_info.control_group, 60.0 * opts.checkpoint_every_minutes, dist_info.is_main)
    last_epoch = opts.epochs if opts.stop_after is None else min(opts.epochs, progress.epoch + opts.stop_after)
    world, accum = dist_info.world_size, opts.accum_iter
    per_step = f"batch {opts.batch_size} x {world}" + (f" x {accum} accumulated" if accum > 1 else "")
    aligned_at_once = opts.batch_size * world * (accum if step.exact_accumulation else 1)
    logger.info(f"training {recipe.arch} for {opts.epochs} epochs on {world} process(es): {len(data.train_set)} train / "
                f"{len(data.val_loader.dataset)} val images, {per_step} = {opts.batch_size * world * accum} per "
                f"step{accum_note}, peak lr {_peak_lr(recipe.optimizer):g}{f' ({opts.lr_note})' if opts.lr_note else ''}, "
                f"{f'alignment {opts.alignment.loss_type} over {aligned_at_once} images at a time' if opts.alignment else 'baseline'}; every argument is in "
                f"{os.path.join(opts.output_dir, 'args.json')}")
    evals = {}
    try:
        if progress.unevaluated is not None:  # stopped between an epoch's checkpoint and its evaluation
            evals = _evaluate(recipe, data, opts, dist_info, progress.epoch - 1)
            _end_epoch(recipe, data, opts, dist_info, progress, progress.epoch - 1, progress.unevaluated, evals, record)
        for epoch in range(progress.epoch, last_epoch):
            train_stats = _train_epoch(recipe, data, opts, dist_info, (step, control, record), progress, epoch)
            if "stopped_at_step" in train_stats:
                _stop(recipe, opts, dist_info, control, progress, epoch, train_stats)
                return {"best": progress.best, "final_acc1": None, "final_ema_acc1": None, "stopped": control.name}
            recipe.step_scheduler(epoch + 1)
            _save_before_evaluation(recipe, opts, dist_info, progress, epoch, train_stats)
            evals = _evaluate(recipe, data, opts, dist_info, epoch)
            _end_epoch(recipe, data, opts, dist_info, progress, epoch, train_stats, evals, record)
            control.saved()
    finally:
        control.restore()
    return _finish(recipe, opts, dist_info, progress, evals)


def _peak_lr(optimizer):
    """The lr the schedule starts from (before any warm-up or decay)."""
    group = optimizer.param_groups[0]
    return group.get("initial_lr", group["lr"])


def _resume(recipe, opts):
    path = find_resume(opts.resume, opts.output_dir)
    if not path:
        return Progress(opts.start_epoch)
    epoch, step, partial, best, unevaluated = restore(recipe, path, opts.epochs, opts.args, bool(opts.resume))
    progress = Progress(epoch, step, partial, unevaluated)
    progress.best.update(best or {})
    return progress


def _save_before_evaluation(recipe, opts, dist_info, progress, epoch, train_stats):
    """The epoch's checkpoint before its evaluation, so that an error there (an unreadable validation
    image) loses no training; a failed save here is reported by the one after the evaluation."""
    try:
        save_checkpoint(training_state(recipe, epoch, progress.best, opts.args, unevaluated=train_stats),
                        os.path.join(opts.output_dir, CHECKPOINT), dist_info.is_main)
    except UserError as e:
        logger.warning(f"{e}; evaluating epoch {epoch} anyway, so that its log row is kept")


def _check_batches(data, opts, dist_info):
    """Refuse a training set too small for one step (drop_last keeps only full batches), or for one
    step of --accum-iter batches; returns the start line's remark on accumulation."""
    per_rank = len(data.sampler.sampler)
    if per_rank < opts.batch_size:
        raise UserError(f"the training set has {len(data.train_set)} images, {per_rank} per process over "
                        f"{dist_info.world_size} process(es): fewer than one batch of {opts.batch_size}, so no step "
                        f"would be trained; lower --batch-size to at most {max(per_rank, 1)} or use more images")
    return check_accumulation(opts.accum_iter, per_rank // opts.batch_size, opts.batch_size, dist_info.world_size)


def _train_epoch(recipe, data, opts, dist_info, loop, progress, epoch):
    """One epoch from the resume position (the first) or its start; checkpoints when ``control`` asks.
    ``loop``: (TrainStep, RunControl, RunRecord)."""
    step, control, record = loop
    start_step, partial = (progress.step, progress.partial) if epoch == progress.epoch else (0, None)
    data.sampler.set_epoch(epoch, start_step * opts.batch_size)

    def save_position(step_in_epoch, sums):
        path = os.path.join(opts.output_dir, CHECKPOINT)
        save_checkpoint(training_state(recipe, epoch, progress.best, opts.args, step_in_epoch=step_in_epoch,
                                       partial=sums), path, dist_info.is_main)
        control.saved()
        logger.info(f"checkpoint at epoch {epoch}, step {step_in_epoch} saved to {path}")

    try:
        return train_one_epoch(step, data.train_loader, epoch, start=EpochStart(step=start_step, partial=partial),
                               control=EpochControl(ask=control, on_checkpoint=save_position),
                               seed=opts.seed + 1000 * dist_info.rank,
                               reporting=Reporting(print_freq=opts.print_freq, num_epochs=opts.epochs,
                                                   sink=record.log_step,
                                                   samples_per_step=opts.batch_size * dist_info.world_size))
    except NonFiniteLoss as e:
        raise UserError(str(e)) from None


def _stop(recipe, opts, dist_info, control, progress, epoch, stats):
    """Save the position a stop request ended the epoch at; with --requeue after SIGUSR1, requeue."""
    path = os.path.join(opts.output_dir, CHECKPOINT)
    step = stats["stopped_at_step"]
    save_checkpoint(training_state(recipe, epoch, progress.best, opts.args, step_in_epoch=step,
                                   partial=stats["partial"]), path, dist_info.is_main)
    logger.warning(f"stopped by {control.name} at epoch {epoch}, step {step}: checkpoint saved to {path}; "
                   f"run the same command again to continue from there")
    if opts.requeue and control.name == "SIGUSR1" and dist_info.is_main:
        requeue_slurm_job()


def requeue_slurm_job():
    """``scontrol requeue $SLURM_JOB_ID``: SLURM starts the job again, which resumes from the checkpoint."""
    job = os.environ.get("SLURM_JOB_ID")  # an array task has its own
    if not job:
        logger.warning("--requeue: no SLURM_JOB_ID in the environment (not a SLURM job); nothing requeued")
        return
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True, timeout=60)
        logger.warning(f"requeued SLURM job {job}: it continues from the checkpoint when it starts again")
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or e
        logger.warning(f"--requeue: 'scontrol requeue {job}' failed ({str(detail).strip()}); resubmit the job by hand")


def _evaluate(recipe, data, opts, dist_info, epoch):
    """Exact evaluation of the raw weights and, when the recipe keeps one, of the EMA (and the
    --eval-set sets when due)."""
    test = evaluate(recipe.model, data.val_loader, dist_info.device, opts.amp_dtype, recipe.channels_last,
                    recipe.eval_prepare)
    ema = None
    if recipe.ema is not None:
        ema = evaluate(recipe.ema.module, data.val_loader, recipe.ema_device or dist_info.device, opts.amp_dtype,
                       prepare=recipe.eval_prepare)
    sets = data.eval_sets.evaluate_recipe(recipe, dist_info.device, opts.amp_dtype) \
        if data.eval_sets is not None and data.eval_sets.due(epoch, opts.epochs) else {}
    return {"test": test, "ema": ema, "sets": sets}


def _end_epoch(recipe, data, opts, dist_info, progress, epoch, train_stats, evals, record):
    """Best tracking, checkpoint (and best checkpoint), one log.txt row."""
    test, ema = evals["test"], evals["ema"]
    ema_text = f" (EMA top-1 {ema['acc1']:.2f}%)" if ema else ""
    logger.info(f"epoch {epoch}: test top-1 {test['acc1']:.2f}% top-5 {test['acc5']:.2f}%{ema_text} "
                f"over {test['num_images']} images")
    if "i2t_r1" in test:
        logger.info(f"epoch {epoch}: alignment on val: image->text R@1 {test['i2t_r1']:.2f}% R@5 {test['i2t_r5']:.2f}%, "
                    f"text->image R@1 {test['t2i_r1']:.2f}% R@5 {test['t2i_r5']:.2f}%, "
                    f"mean image-description cosine {test['pair_cosine']:.3f}")
    best = progress.best
    improved = test["acc1"] > best["acc1"]
    if improved:
        best.update(acc1=test["acc1"], epoch=epoch)
    if ema and ema["acc1"] > best["ema_acc1"]:
        best.update(ema_acc1=ema["acc1"], ema_epoch=epoch)
    extra = dict(recipe.log_extra)
    if isinstance(data.train_set, SkipCorrupt):
        extra["train_corrupt_images_skipped"] = data.train_set.skipped.value
    extra.update(evals.get("sets") or {})
    record.log_epoch(epoch_row(epoch, train_stats, test, ema, **extra))  # first: kept when a save fails
    heartbeat(f"the checkpoint of epoch {epoch}")
    state = training_state(recipe, epoch, best, opts.args)
    save_checkpoint(state, os.path.join(opts.output_dir, CHECKPOINT), dist_info.is_main)
    if improved:
        save_checkpoint(state, os.path.join(opts.output_dir, recipe.best_name), dist_info.is_main)


def _finish(recipe, opts, dist_info, progress, evals):
    """Export the plain classifier(s), say where everything is, print the final line."""
    out = opts.output_dir
    if dist_info.is_main:
        atomic_torch_save(recipe.model.backbone.state_dict(), os.path.join(out, "classifier.pth"))
        exported = "classifier.pth"
        if recipe.ema is not None:
            atomic_torch_save(recipe.ema.module.backbone.state_dict(), os.path.join(out, "classifier_ema.pth"))
            exported += " and classifier_ema.pth"
        logger.info(f"outputs in {os.path.abspath(out)}: {CHECKPOINT}, {recipe.best_name}, {exported}, log.txt, "
                    f"args.json, tensorboard/")
        logger.info(f"the classifier without any code of ours: {recipe.classifier_hint} (on a CPU-only torch with "
                    f"PyPI's torchvision, import gpt4image first)")
    final = (evals.get("test") or {}).get("acc1")
    final_ema = (evals.get("ema") or {}).get("acc1")
    return _final_line(recipe, progress.best, final, final_ema, evals.get("sets"))


def _final_line(recipe, best, final, final_ema, sets=None):
    nan = float("nan")
    on_sets = f"; eval sets: {eval_sets_summary(sets)}" if sets else ""
    if recipe.ema is None:
        logger.info(f"best top-1 {best['acc1']:.2f}% at epoch {best['epoch']}, "
                    f"final top-1 {nan if final is None else final:.2f}%{on_sets}")
    else:
        logger.info(f"best top-1 {best['acc1']:.2f}% (raw) / {best['ema_acc1']:.2f}% (EMA) at epochs "
                    f"{best['epoch']}/{best['ema_epoch']}, final {nan if final is None else final:.2f}% / "
                    f"{nan if final_ema is None else final_ema:.2f}%{on_sets}")
    return {"best": best, "final_acc1": final, "final_ema_acc1": final_ema, "stopped": None, "eval_sets": sets or {}}


def _already_finished(recipe, opts, progress):
    """A rerun of a finished run trains nothing: it says so and repeats the run's final line."""
    log = os.path.join(opts.output_dir, "log.txt")
    rows = read_log(log) if os.path.isfile(log) else []
    last = rows[-1] if rows else {}
    logger.info(f"{os.path.abspath(opts.output_dir)} holds a finished run of {opts.epochs} epochs, so there is nothing "
                f"to train; to train longer, start a new run in another output folder")
    return _final_line(recipe, progress.best, last.get("test_acc1"), last.get("ema_test_acc1"), sets_in(last))


def wrap_distributed(model, dist_info, sync_bn=False):
    """(model to train with, the same model without DDP) : SyncBN (optional) and DDP when several
    processes run; SyncBN conversion keeps the parameters, so checkpoints hold the unwrapped one's."""
    if not dist_info.distributed:
        return model, model
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device = dist_info.device
    # gradients live in DDP's all-reduce buckets: no copy in and out of them after every backward
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                    gradient_as_bucket_view=True)
    return ddp, model


def run_recipe(parser, run, argv=None):
    """A recipe's ``main``: parse, set up the process group and logging, ``run(args, dist_info,
    device)``, and always tear the process group down."""
    args = parser.parse_args(argv)
    dist_info = init_distributed(args.local_rank, args.device)
    setup_logging(dist_info.is_main)
    try:
        return run(args, dist_info, dist_info.device)
    finally:
        cleanup()


def script_exit(main, argv):
    """``if __name__ == "__main__"`` of a recipe: exit 2 with one line on bad input, 75 after a stop
    request (run the same command to continue), 0 when done."""
    result = exit_on_user_error(main, argv)
    sys.exit(PREEMPTED_EXIT_CODE if isinstance(result, dict) and result.get("stopped") else 0)


def adopt_checkpoint_settings(args, parser, keys, recipe):
    """-e / --eval of one of our checkpoints: the model settings ``keys`` it was trained with (model,
    input size, classes) replace the defaults; a flag given with another value is an error naming
    both. Returns the loaded checkpoint (or plain state dict)."""
    state = load_checkpoint(args.resume)
    saved = state.get("args") if isinstance(state, dict) and state.get("recipe") in (None, recipe) else None
    if not isinstance(saved, dict):
        return state
    taken = []
    for key in keys:
        if key not in saved or getattr(args, key) == saved[key]:
            continue
        if getattr(args, key) != parser.get_default(key):
            raise UserError(f"--{key.replace('_', '-')} {getattr(args, key)} contradicts {args.resume!r}, which was "
                            f"trained with {saved[key]}; leave the flag out to evaluate the checkpoint as trained")
        setattr(args, key, saved[key])
        taken.append(f"{key} {saved[key]}")
    if taken:
        logger.info(f"evaluation settings from {args.resume}: {', '.join(taken)}")
    return state


def evaluate_checkpoint(model, state, path, loader, device, amp_dtype=None, channels_last=False, prepare=None,
                        recipe=None, eval_sets=None):
    """-e / --eval: our checkpoint (its raw weights, and its EMA when it has one), or a plain
    torchvision/timm state dict, over the validation set (and the --eval-set sets: ``stats["sets"]``)."""
    load_classifier_weights(model.backbone, state, path, recipe)
    ema = state.get("model_ema") if isinstance(state, dict) else None
    which = " (raw weights)" if ema else ""
    stats = evaluate(model, loader, device, amp_dtype, channels_last, prepare)
    logger.info(f"evaluation of {path}{which}: top-1 {stats['acc1']:.3f}% top-5 {stats['acc5']:.3f}% "
                f"loss {stats['loss']:.4f} over {stats['num_images']} images")
    sets = eval_sets.evaluate(model, device, amp_dtype, channels_last, prepare) if eval_sets else {}
    if ema:
        model.backbone.load_state_dict({k[len("backbone."):]: v for k, v in ema.items() if k.startswith("backbone.")})
        stats["ema"] = evaluate(model, loader, device, amp_dtype, channels_last, prepare)
        logger.info(f"evaluation of {path} (EMA weights): top-1 {stats['ema']['acc1']:.3f}% "
                    f"top-5 {stats['ema']['acc5']:.3f}% over {stats['ema']['num_images']} images")
        sets.update(eval_sets.evaluate(model, device, amp_dtype, channels_last, prepare, "ema_") if eval_sets else {})
    if sets:
        stats["sets"] = sets
        logger.info(f"eval sets of {path}: {eval_sets_summary(sets)}")
    return stats
