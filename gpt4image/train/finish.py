"""The end of a run: the exported classifiers, where everything is, the final line; a rerun of a
finished run; a SLURM requeue after a stop request."""
import os
import subprocess

from ..io import atomic_torch_save
from ..log import logger
from .eval_sets import sets_in, summary as eval_sets_summary
from .run_record import read_log
from .state_dicts import CHECKPOINT


def finish(trainer, evals: dict) -> dict:
    """Export the plain classifier(s), say where everything is, print the final line."""
    out = trainer.config.run_dir
    if trainer.dist_info.is_main:
        atomic_torch_save(trainer.model.backbone.state_dict(), os.path.join(out, "classifier.pth"))
        exported = "classifier.pth"
        if trainer.ema is not None:
            atomic_torch_save(trainer.ema.module.backbone.state_dict(), os.path.join(out, "classifier_ema.pth"))
            exported += " and classifier_ema.pth"
        logger.info(f"outputs in {os.path.abspath(out)}: {CHECKPOINT}, {trainer.best_name}, {exported}, log.txt, "
                    f"args.json, tensorboard/")
        logger.info(f"the classifier without any code of ours: {trainer.classifier_hint} (on a CPU-only torch with "
                    f"PyPI's torchvision, import gpt4image first)")
    final = (evals.get("test") or {}).get("acc1")
    final_ema = (evals.get("ema") or {}).get("acc1")
    return final_line(trainer.ema is not None, trainer.progress.best, final, final_ema, evals.get("sets"))


def final_line(has_ema: bool, best: dict, final, final_ema, sets=None) -> dict:
    """Log the run's last line; returns the result of ``Trainer.fit``."""
    nan = float("nan")
    on_sets = f"; eval sets: {eval_sets_summary(sets)}" if sets else ""
    if not has_ema:
        logger.info(f"best top-1 {best['acc1']:.2f}% at epoch {best['epoch']}, "
                    f"final top-1 {nan if final is None else final:.2f}%{on_sets}")
    else:
        logger.info(f"best top-1 {best['acc1']:.2f}% (raw) / {best['ema_acc1']:.2f}% (EMA) at epochs "
                    f"{best['epoch']}/{best['ema_epoch']}, final {nan if final is None else final:.2f}% / "
                    f"{nan if final_ema is None else final_ema:.2f}%{on_sets}")
    return {"best": best, "final_acc1": final, "final_ema_acc1": final_ema, "stopped": None, "eval_sets": sets or {}}


def already_finished(trainer) -> dict:
    """A rerun of a finished run trains nothing: it says so and repeats the run's final line."""
    out, epochs = trainer.config.run_dir, trainer.config.epochs
    log = os.path.join(out, "log.txt")
    rows = read_log(log) if os.path.isfile(log) else []
    last = rows[-1] if rows else {}
    logger.info(f"{os.path.abspath(out)} holds a finished run of {epochs} epochs, so there is nothing "
                f"to train; to train longer, start a new run in another output folder")
    return final_line(trainer.ema is not None, trainer.progress.best, last.get("test_acc1"),
                      last.get("ema_test_acc1"), sets_in(last))


def requeue_slurm_job() -> None:
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
