"""The typed settings of a run: one keyword-only dataclass per recipe, built once from the parsed
command line (``Config.from_args``). The loop reads its settings from it, and args.json and the
checkpoint's "args" record it (``recorded()``), so every setting has one source.

``CommonConfig`` holds the flags of ``options.add_common_args``; a recipe's config adds its own."""
import dataclasses
from dataclasses import dataclass

import torch


@dataclass(kw_only=True)
class CommonConfig:
    """Flags both recipes share (options.add_common_args); ``world_size`` and
    ``text_emb_fingerprint`` are filled in at start (recorded with the arguments)."""
    config: str | None
    amp_dtype: str | None
    compile: bool
    gather_with_grad: bool
    local_loss: bool
    val_text_emb: str | None
    text_per_step: str | None
    device: str | None
    skip_corrupt_images: bool
    stop_after: int | None
    checkpoint_every_minutes: float
    accum_iter: int
    stall_timeout: float
    wandb_project: str | None
    wandb_mode: str | None
    requeue: bool
    local_rank: int | None
    eval_set: list
    eval_sets_every_epoch: bool
    text_target: str
    label_noise: float
    train_fraction: float
    shots: float | None
    text_weight_schedule: str
    text_weight_every: str
    text_emb_standardize: bool
    accum_alignment: str
    nonfinite: str = "stop"  # --nonfinite {stop,skip} (train/guard.py's add_guard_args)
    # the run-wide fields every recipe has under the same name
    epochs: int
    batch_size: int
    seed: int
    print_freq: int
    resume: str
    start_epoch: int
    text_emb: str
    proj_type: str
    loss_type: str
    lamb: float
    tau: float
    world_size: int = 1
    text_emb_fingerprint: str | None = None

    @classmethod
    def from_args(cls, args) -> "CommonConfig":
        """The config of parsed ``args`` (an argparse Namespace); a flag without a field is a
        programming error named here (declare the field)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = vars(args)
        unknown = sorted(set(values) - names)
        if unknown:
            raise TypeError(f"{cls.__name__} has no field for the parsed argument(s) {unknown}: declare them")
        return cls(**values)

    @property
    def run_dir(self) -> str:
        """Where the run writes (the recipes name the flag differently: --save_dir, --output_dir)."""
        raise NotImplementedError

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The torch dtype of --amp-dtype (None: float32)."""
        return getattr(torch, self.amp_dtype) if self.amp_dtype else None

    def recorded(self) -> dict:
        """The resolved arguments as args.json and the checkpoint's "args" record them."""
        return dict(vars(self))
