"""Command-line flags both recipes share beyond their original ones, and what they turn into."""
import argparse

import torch

from ..log import logger
from ..errors import UserError
from ..cli import at_least
from .checkpoint import find_resume
from .eval_sets import add_eval_set_args
from .alignment import Alignment
from .alignment_state import AlignmentState, needs_state
from .guard import add_guard_args
from .run_checks import FINGERPRINT_KEY, cap_workers, table_fingerprint
from .run_record import require_wandb
from .text_weight import add_alignment_args, check_alignment_args
from .text_per_step import add_text_per_step_args
from .target_rows import row_blocks
from .text_targets import CLASS_LEVEL, add_text_target_args


def add_common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags that both recipes share beyond their original ones."""
    p.add_argument("-c", "--config", default=None, metavar="FILE.yaml",
                   help="defaults from a YAML file whose keys are flag names (timm's convention); the command line "
                        "overrides them; args.json records the resolved arguments")
    p.add_argument("--amp-dtype", choices=["float16", "bfloat16"], default=None,
                   help="autocast dtype (float16 uses a checkpointed GradScaler; bfloat16 needs none)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--gather-with-grad", action="store_true",
                   help="clip loss: gathered features carry gradient (weight lamb, not lamb/W; a deviation)")
    p.add_argument("--local-loss", action="store_true",
                   help="clip loss with --gather-with-grad: compute only this rank's rows (same gradient, less memory)")
    p.add_argument("--val-text-emb", default=None, metavar="TABLE",
                   help="embeddings of the validation images' descriptions (generate_descriptions.py and "
                        "description2embedding.py on val/): each evaluation adds image->text and text->image "
                        "recall@1/@5 and the mean image-description cosine")
    add_text_per_step_args(p)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--skip-corrupt-images", action="store_true",
                   help="replace a training image that cannot be decoded by the next one (warned and counted in "
                        "log.txt) instead of stopping")
    p.add_argument("--stop-after", type=at_least(1), default=None, metavar="N",
                   help="end this invocation after N epochs (job time limits); run the same command to continue")
    p.add_argument("--checkpoint-every-minutes", type=at_least(0.0, float), default=30.0, metavar="M",
                   help="also save checkpoint.pth inside an epoch every M minutes (0: only at epoch ends), so a "
                        "crashed or restarted job loses at most M minutes")
    p.add_argument("--accum-iter", type=at_least(1), default=1, metavar="N",
                   help="sum the gradients of N batches per optimizer step (the paper's global batch on fewer GPUs; "
                        "the lr scales with the effective batch; the alignment loss sees each batch x W)")
    p.add_argument("--stall-timeout", type=at_least(0.0, float), default=300.0, metavar="S",
                   help="end a multi-process job when a rank makes no progress for S seconds (or 20 x its slowest "
                        "step, if longer) instead of waiting for the 30-minute collective timeout; 0: never")
    p.add_argument("--wandb-project", default=None, metavar="NAME",
                   help="also log to Weights & Biases (pip install wandb; offline when it cannot be reached)")
    p.add_argument("--wandb-mode", choices=["online", "offline"], default=None,
                   help="W&B mode (default: online when api.wandb.ai answers, else offline)")
    p.add_argument("--requeue", action="store_true",
                   help="SLURM: after SIGUSR1 (#SBATCH --signal=USR1@120) save and 'scontrol requeue' the job")
    p.add_argument("--local-rank", "--local_rank", type=int, default=None, dest="local_rank",
                   help="set by the legacy torch.distributed.launch without --use_env")
    add_eval_set_args(p)
    add_guard_args(p)
    add_text_target_args(p)
    return add_alignment_args(p)


def start_run(args, dist_info) -> torch.dtype | None:
    """Checks both recipes begin with (``args``: the recipe's config); records the world size and caps
    the loader workers; returns the autocast dtype (None: fp32)."""
    if args.local_loss and not args.gather_with_grad:
        raise UserError("--local-loss needs --gather-with-grad")
    check_alignment_args(args)
    require_wandb(args)
    args.world_size = dist_info.world_size
    cap_workers(args, "--workers" if hasattr(args, "workers") else "--num_workers")
    return getattr(torch, args.amp_dtype) if args.amp_dtype else None


def alignment_from_args(args, embeddings, world_size: int) -> Alignment | None:
    """The run's Alignment (None: the baseline), logged with its effective weight; the table's
    fingerprint joins the run's arguments (a resume checks it)."""
    setattr(args, FINGERPRINT_KEY, table_fingerprint(embeddings))
    if embeddings is None:
        logger.info("text alignment: off (baseline)")
        return None
    alignment = Alignment(args.loss_type, args.tau, args.lamb, args.gather_with_grad, args.local_loss,
                          check_alignment_args(args), args.accum_alignment == "exact",
                          shared_targets=args.text_target in CLASS_LEVEL)
    logger.info(f"{alignment.describe(world_size)} text_target={args.text_target}")
    return alignment


def alignment_state_for(args, text_dim: int | None) -> AlignmentState | None:
    """The ``AlignmentState`` a model with a projection head keeps (None when its loss needs none)."""
    if text_dim is None or not needs_state(args.loss_type, args.text_emb_standardize):
        return None
    return AlignmentState(args.loss_type, text_dim, args.text_emb_standardize)


def prepare_alignment_state(model: torch.nn.Module, args, embeddings, output_dir: str) -> None:
    """--text-emb-standardize: the training table's statistics, computed once at the start of a run
    (a resumed run takes those of its checkpoint). Call before the optimizer and EMA are built."""
    state = getattr(model, "alignment_state", None)
    if state is None or not state.standardize:
        return
    if find_resume(args.resume, output_dir):
        logger.info("--text-emb-standardize: the text statistics come from the checkpoint")
        return
    state.set_statistics_of_blocks(row_blocks(embeddings))  # the rows trained towards (kept images, class rows)
    logger.info(f"--text-emb-standardize: per-dimension mean and std of {len(embeddings)} text rows computed "
                f"(mean |mean| {state.text_mean.abs().mean().item():.3g}, "
                f"mean std {state.text_std.mean().item():.3g}); kept in the checkpoint")
