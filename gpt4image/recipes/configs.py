"""The typed config of each recipe: every flag of its parser as a field (``from_args`` refuses a
parsed flag without one), beside the shared ones of ``CommonConfig``."""
from dataclasses import dataclass

from gpt4image.train.config import CommonConfig


@dataclass(kw_only=True)
class ResNetConfig(CommonConfig):
    """resnet/main.py's flags (get_args_parser in recipes/resnet.py)."""
    data: str | None
    save_dir: str
    arch: str
    workers: int
    lr: float
    no_scale_lr: bool
    momentum: float
    wd: float
    pretrained: str
    evaluate: bool
    use_amp: bool
    sync_bn: bool
    channels_last: bool
    input_size: int
    min_lr: float
    num_classes: int
    generated_size: list

    @property
    def run_dir(self) -> str:
        return self.save_dir


@dataclass(kw_only=True)
class DeiTConfig(CommonConfig):
    """deit/main.py's flags (get_args_parser in recipes/deit.py)."""
    bce_loss: bool
    unscale_lr: bool
    model: str
    input_size: int
    drop: float
    drop_path: float
    model_ema: bool
    model_ema_decay: float
    model_ema_force_cpu: bool
    opt: str
    opt_eps: float
    opt_betas: list | None
    clip_grad: float | None
    momentum: float
    weight_decay: float
    sched: str
    lr: float
    warmup_lr: float
    min_lr: float
    warmup_epochs: int
    sched_no_lag: bool
    color_jitter: float
    aa: str
    smoothing: float
    train_interpolation: str
    repeated_aug: bool
    reprob: float
    remode: str
    recount: int
    mixup: float
    cutmix: float
    cutmix_minmax: list | None
    mixup_prob: float
    mixup_switch_prob: float
    mixup_mode: str
    mix_text: bool
    eval_crop_ratio: float
    teacher_model: str
    teacher_path: str
    distillation_type: str
    distillation_alpha: float
    distillation_tau: float
    finetune: str
    data_path: str | None
    data_set: str
    nb_classes: int
    generated_size: list
    output_dir: str
    eval: bool
    dist_eval: bool
    num_workers: int
    pin_mem: bool

    @property
    def run_dir(self) -> str:
        return self.output_dir
