"""The training loop of both recipes: resume, train, evaluate, checkpoint, log, export, stop.

A recipe builds a ``Trainer`` with keyword arguments (its model, optimizer, scheduler, criterion,
loaders and its typed config) and calls ``fit()``; everything that happens between epochs is here,
once. The trainer owns the run's state (model, optimizer, scheduler, scaler, EMA, progress) and
saves and restores it itself (``state_dict``, ``restore``)."""
import os
from dataclasses import dataclass, field
from collections.abc import Callable

import torch

from ..errors import UserError
from ..log import logger
from .checkpoint import find_resume, restore, save_checkpoint, training_state
from .checkpoints import Checkpoints, Progress
from .config import CommonConfig
from .data import SkipCorrupt
from .distributed import heartbeat, start_watchdog, stop_watchdog
from .epoch import EpochControl, EpochStart, NonFiniteLoss, Reporting, train_one_epoch
from .evaluate import evaluate
from .finish import already_finished, finish, requeue_slurm_job
from .launch import wrap_distributed
from .lock import RunLock
from .alignment import Alignment
from .resumable import RunControl
from .run_checks import check_accumulation
from .run_record import RunRecord, epoch_row
from .step import TrainStep
from .text_targets import write_train_labels


@dataclass(kw_only=True)
class Data:
    """The training set (for its size and skipped-image count), its resumable loader and sampler, and
    the exact validation loader (and the --eval-set sets)."""
    train_set: object
    train_loader: object
    sampler: object
    val_loader: object
    eval_sets: object = None  # eval_sets.EvalSets of --eval-set


@dataclass(kw_only=True)
class Trainer:
    """One run of a recipe. ``model`` is the TextAlignedModel (never wrapped; ``train_model`` is what
    trains: DDP, compiled); ``step_scheduler(epochs_done)`` positions the scheduler for the next
    epoch (after every epoch and once after a resume, so it must be idempotent);
    ``criterion(images, logits, targets)``."""
    config: CommonConfig
    dist_info: object
    data: Data
    name: str
    arch: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    step_scheduler: Callable[[int], None]
    criterion: Callable
    scaler: torch.amp.GradScaler
    alignment: Alignment | None = None
    text_dim: int | None = None
    train_prepare: Callable | None = None
    eval_prepare: Callable | None = None
    mix_fn: Callable | None = None
    ema: object = None
    ema_device: torch.device | None = None
    clip_grad: float | None = None
    sync_bn: bool = False
    channels_last: bool = False
    best_name: str = "best_checkpoint.pth"
    classifier_hint: str = ""
    classes: list | None = None  # class names in output order, kept in the checkpoint (eval sets map by them)
    log_extra: dict = field(default_factory=dict)
    lr_note: str = ""  # how the lr came about (scaled or as given), for the start line
    progress: Progress = field(init=False, default_factory=Progress)
    checkpoints: Checkpoints = field(init=False)
    record: RunRecord | None = field(init=False, default=None)
    control: RunControl | None = field(init=False, default=None)
    step: TrainStep | None = field(init=False, default=None)

    def __post_init__(self):
        self.checkpoints = Checkpoints(output_dir=self.config.run_dir, best_name=self.best_name,
                                       is_main=self.dist_info.is_main)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return self.config.autocast_dtype

    def fit(self) -> dict:
        """Train from the output folder's checkpoint (or from scratch) to ``config.epochs``.

        Returns {"best", "final_acc1", "final_ema_acc1", "stopped", "eval_sets"}; ``stopped`` is the
        signal's name when a stop request ended the run early (its checkpoint holds the position)."""
        cfg, dist_info = self.config, self.dist_info
        with RunLock(cfg.run_dir, dist_info.is_main):
            self.restore()
            if self.progress.epoch >= cfg.epochs and self.progress.unevaluated is None:
                return already_finished(self)
            accum_note = self._check_batches()
            self.record = RunRecord(cfg.run_dir, cfg.recorded(), dist_info.is_main, self.name)  # checks passed
            write_train_labels(self.data.train_set, cfg.run_dir, dist_info.is_main)
            if self.progress.epoch or self.progress.step:  # an unevaluated epoch's row is written again
                self.record.truncate_after(self.progress.epoch - (self.progress.unevaluated is not None))
            start_watchdog(dist_info.rank, dist_info.world_size, cfg.stall_timeout)
            try:
                return self._train(accum_note)
            finally:
                stop_watchdog()
                self.record.close()

    def restore(self) -> None:
        """The state of the checkpoint to resume from (--resume, else the output folder's), if any."""
        path = find_resume(self.config.resume, self.config.run_dir)
        if not path:
            self.progress = Progress(epoch=self.config.start_epoch)
            return
        self.progress = self.checkpoints.resumed(restore(self, path, bool(self.config.resume)), path)

    def state_dict(self, epoch: int, **position) -> dict:
        """The checkpoint after ``epoch`` (``position``: step_in_epoch and partial, or unevaluated)."""
        return training_state(self, epoch, **position)

    def save(self, epoch: int, **position) -> None:
        save_checkpoint(self.state_dict(epoch, **position), self.checkpoints.path, self.dist_info.is_main)

    def _train(self, accum_note: str) -> dict:
        cfg, progress = self.config, self.progress
        self.step_scheduler(progress.epoch)
        self.step = self._build_step()
        self.control = RunControl(self.dist_info.control_group, 60.0 * cfg.checkpoint_every_minutes,
                                  self.dist_info.is_main)
        last_epoch = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, progress.epoch + cfg.stop_after)
        self._log_start(accum_note)
        evals = {}
        try:
            if progress.unevaluated is not None:  # stopped between an epoch's checkpoint and its evaluation
                evals = self._evaluate_and_record(progress.epoch - 1, progress.unevaluated)
            for epoch in range(progress.epoch, last_epoch):
                train_stats = self._train_epoch(epoch)
                if "stopped_at_step" in train_stats:
                    self._stop(epoch, train_stats)
                    return {"best": progress.best, "final_acc1": None, "final_ema_acc1": None,
                            "stopped": self.control.name}
                self.step_scheduler(epoch + 1)
                evals = self._evaluate_and_record(epoch, train_stats, save_error=self._save_epoch(epoch, train_stats))
                self.control.saved()
        finally:
            self.control.restore()
        return finish(self, evals)

    def _build_step(self) -> TrainStep:
        cfg = self.config
        train_model = wrap_distributed(self.model, self.dist_info, self.sync_bn)
        return TrainStep(
            model=torch.compile(train_model) if cfg.compile else train_model, optimizer=self.optimizer,
            criterion=self.criterion, device=self.dist_info.device, alignment=self.alignment,
            amp_dtype=self.amp_dtype, scaler=self.scaler, mix_fn=self.mix_fn, ema=self.ema,
            clip_grad=self.clip_grad, prepare=self.train_prepare, channels_last=self.channels_last,
            accum_iter=cfg.accum_iter, nonfinite=cfg.nonfinite)

    def _log_start(self, accum_note: str) -> None:
        cfg, data = self.config, self.data
        world, accum, batch = self.dist_info.world_size, cfg.accum_iter, cfg.batch_size
        per_step = f"batch {batch} x {world}" + (f" x {accum} accumulated" if accum > 1 else "")
        at_once = batch * world * (accum if self.step.exact_accumulation else 1)
        group = self.optimizer.param_groups[0]
        peak = group.get("initial_lr", group["lr"])  # the lr the schedule starts from
        how = (f"alignment {self.alignment.loss_type} over {at_once} images at a time" if self.alignment
               else "baseline")
        logger.info(f"training {self.arch} for {cfg.epochs} epochs on {world} process(es): {len(data.train_set)} "
                    f"train / {len(data.val_loader.dataset)} val images, {per_step} = {batch * world * accum} per "
                    f"step{accum_note}, peak lr {peak:g}{f' ({self.lr_note})' if self.lr_note else ''}, {how}; "
                    f"every argument is in {os.path.join(cfg.run_dir, 'args.json')}")

    def _check_batches(self) -> str:
        """Refuse a training set too small for one step (drop_last keeps only full batches), or for one
        step of --accum-iter batches; returns the start line's remark on accumulation."""
        per_rank, batch, world = len(self.data.sampler.sampler), self.config.batch_size, self.dist_info.world_size
        if per_rank < batch:
            raise UserError(f"the training set has {len(self.data.train_set)} images, {per_rank} per process over "
                            f"{world} process(es): fewer than one batch of {batch}, so no step would be trained; "
                            f"lower --batch-size to at most {max(per_rank, 1)} or use more images")
        return check_accumulation(self.config.accum_iter, per_rank // batch, batch, world)

    def _train_epoch(self, epoch: int) -> dict:
        """One epoch from the resume position (the first) or its start; checkpoints when ``control`` asks."""
        progress, cfg = self.progress, self.config
        start_step, partial = (progress.step, progress.partial) if epoch == progress.epoch else (0, None)
        self.data.sampler.set_epoch(epoch, start_step * cfg.batch_size)

        def save_position(step_in_epoch, sums):
            self.save(epoch, step_in_epoch=step_in_epoch, partial=sums)
            self.control.saved()
            logger.info(f"checkpoint at epoch {epoch}, step {step_in_epoch} saved to {self.checkpoints.path}")

        reporting = Reporting(print_freq=cfg.print_freq, num_epochs=cfg.epochs, sink=self.record.log_step,
                              samples_per_step=cfg.batch_size * self.dist_info.world_size)
        try:
            return train_one_epoch(self.step, self.data.train_loader, epoch,
                                   start=EpochStart(step=start_step, partial=partial),
                                   control=EpochControl(ask=self.control, on_checkpoint=save_position),
                                   seed=cfg.seed + 1000 * self.dist_info.rank, reporting=reporting)
        except NonFiniteLoss as e:
            raise UserError(f"{e}; {self.checkpoints.last_good()}") from None

    def _stop(self, epoch: int, stats: dict) -> None:
        """Save the position a stop request ended the epoch at; with --requeue after SIGUSR1, requeue."""
        step = stats["stopped_at_step"]
        self.save(epoch, step_in_epoch=step, partial=stats["partial"])
        logger.warning(f"stopped by {self.control.name} at epoch {epoch}, step {step}: checkpoint saved to "
                       f"{self.checkpoints.path}; run the same command again to continue from there")
        if self.config.requeue and self.control.name == "SIGUSR1" and self.dist_info.is_main:
            requeue_slurm_job()

    def _save_epoch(self, epoch: int, train_stats: dict) -> UserError | None:
        """The epoch's one checkpoint, before its evaluation (an error there, an unreadable validation
        image, loses no training); a failed save is reported after the evaluation has been logged."""
        heartbeat(f"the checkpoint of epoch {epoch}")
        try:
            self.save(epoch, unevaluated=train_stats)
        except UserError as e:
            logger.warning(f"{e}; evaluating epoch {epoch} anyway, so that its log row is kept")
            return e
        return None

    def evaluate(self, epoch: int) -> dict:
        """Exact evaluation of the raw weights and, when there is one, of the EMA (and the --eval-set
        sets when due)."""
        device, sets = self.dist_info.device, self.data.eval_sets
        test = evaluate(self.model, self.data.val_loader, device, self.amp_dtype, self.channels_last,
                        self.eval_prepare)
        ema = None
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.data.val_loader, self.ema_device or device, self.amp_dtype,
                           prepare=self.eval_prepare)
        due = sets is not None and sets.due(epoch, self.config.epochs)
        return {"test": test, "ema": ema, "sets": sets.evaluate_recipe(self, device, self.amp_dtype) if due else {}}

    def _evaluate_and_record(self, epoch: int, train_stats: dict, save_error: UserError | None = None) -> dict:
        """Evaluate epoch ``epoch``, track the best, write its log.txt row, then the small record of the
        evaluation (and the best link); a failed checkpoint save is raised once the row is kept."""
        evals = self.evaluate(epoch)
        test, ema = evals["test"], evals["ema"]
        _log_evaluation(epoch, test, ema)
        new_best = self.progress.update_best(test, ema, epoch)
        extra = dict(self.log_extra)
        if isinstance(self.data.train_set, SkipCorrupt):
            extra["train_corrupt_images_skipped"] = self.data.train_set.skipped.value
        extra.update(evals.get("sets") or {})
        self.record.log_epoch(epoch_row(epoch, train_stats, test, ema, **extra))
        if save_error is not None:
            raise save_error
        self.checkpoints.record_evaluation(epoch, self.progress.best, new_best)
        return evals


def _log_evaluation(epoch, test, ema):
    ema_text = f" (EMA top-1 {ema['acc1']:.2f}%)" if ema else ""
    logger.info(f"epoch {epoch}: test top-1 {test['acc1']:.2f}% top-5 {test['acc5']:.2f}%{ema_text} "
                f"over {test['num_images']} images")
    if "i2t_r1" in test:
        logger.info(f"epoch {epoch}: alignment on val: image->text R@1 {test['i2t_r1']:.2f}% R@5 "
                    f"{test['i2t_r5']:.2f}%, text->image R@1 {test['t2i_r1']:.2f}% R@5 {test['t2i_r5']:.2f}%, "
                    f"mean image-description cosine {test['pair_cosine']:.3f}")
