"""DeiT-base on ImageNet-1k with the GPT4Image text-alignment loss (arXiv 2306.00693).

    cd deit && torchrun --nproc_per_node=8 main.py --data-path=/path/to/imagenet --batch-size=128 \\
        --text_emb=imagenet_clip_text_emb_0_1281166.pth --output_dir=./outputs

The full DeiT recipe (RandAugment, random erasing, repeated augmentation, Mixup/CutMix, label
smoothing, EMA, AdamW with warm-up and cosine, optional distillation) on timm 1.x, plus the
alignment of the class token (after the final norm) with the stored text embeddings.
"""
import sys

import gpt4image  # noqa: F401  (first: makes torchvision importable)
import timm
import torch
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from gpt4image.recipes.deit_criteria import build_criterion
from gpt4image.recipes.deit_data import DeviceAugment, build_datasets
from gpt4image import RASampler, TextAlignedModel, build_projection_head
from gpt4image.train.checkpoint import cached_timm_weights, load_pretrained
from gpt4image.train.data import (SkipCorrupt, attach_text_embeddings, attach_val_text_embeddings, build_eval_loader,
                            build_train_loader)
from gpt4image.log import logger
from gpt4image.errors import UserError
from gpt4image.cli import ArgumentParser, at_least, in_range
from gpt4image.train.eval_sets import build_eval_sets, run_classes
from gpt4image.train.losses import LOSS_TYPES
from gpt4image.recipes.configs import DeiTConfig
from gpt4image.train.eval_only import Evaluation, adopt_checkpoint_settings, evaluate_checkpoint
from gpt4image.train.launch import run_recipe, script_exit
from gpt4image.train.options import (add_common_args, alignment_from_args, alignment_state_for, prepare_alignment_state,
                                     start_run)
from gpt4image.train.resumable import seed_all
from gpt4image.train.run_checks import scaled_lr, warn_if_all_warmup
from gpt4image.train.text_targets import TrainingTargets
from gpt4image.train.trainer import Data, Trainer

RECIPE = "deit"
COUNT, POSITIVE = at_least(0), at_least(1)
UNIT, UNIT_OPEN = in_range(minimum=0, maximum=1), in_range(minimum=0, below=1)


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser("GPT4Image DeiT recipe", description=__doc__)
    a = p.add_argument
    a("--batch-size", default=128, type=POSITIVE, help="per process (paper: 8 x 128)")
    a("--epochs", default=300, type=POSITIVE, help="training epochs (the schedule spans them all)")
    a("--bce-loss", action="store_true", help="binary cross-entropy instead of cross-entropy (DeiT III)")
    a("--unscale-lr", action="store_true", help="use --lr as given (else lr x batch x W / 512)")
    # model
    a("--model", default="deit_base_patch16_224", type=str,
      help="any timm model name (deit_base_patch16_224 in the paper)")
    a("--input-size", default=224, type=at_least(8), help="image size for training and evaluation")
    a("--drop", type=UNIT_OPEN, default=0.0, help="dropout rate")
    a("--drop-path", type=UNIT_OPEN, default=0.1, help="stochastic depth rate")
    a("--model-ema", action="store_true", default=True,
      help="keep an exponential moving average of the weights (released: on)")
    a("--no-model-ema", action="store_false", dest="model_ema", help="no EMA")
    a("--model-ema-decay", type=UNIT, default=0.99996, help="EMA decay per step")
    a("--model-ema-force-cpu", action="store_true", default=False,
      help="keep the EMA on the CPU (and evaluate it there)")
    # optimizer and schedule
    a("--opt", default="adamw", choices=["adamw"], help="AdamW (fused on CUDA)")
    a("--opt-eps", default=1e-8, type=in_range(above=0), help="AdamW epsilon")
    a("--opt-betas", default=None, type=UNIT_OPEN, nargs="+", help="AdamW betas (default 0.9 0.999)")
    a("--clip-grad", type=in_range(above=0), default=None,
      help="clip the gradient norm to this value (None: no clipping)")
    a("--momentum", type=in_range(minimum=0, below=1), default=0.9,
      help="unused by AdamW; kept for DeiT's command lines")
    a("--weight-decay", type=in_range(minimum=0), default=0.05,
      help="AdamW weight decay (not on biases, norms, position embeddings, tokens)")
    a("--sched", default="cosine", choices=["cosine"], help="learning-rate schedule")
    a("--lr", type=in_range(above=0), default=5e-4,
      help="peak learning rate for a global batch of 512 (scaled by batch x W / 512)")
    a("--warmup-lr", type=in_range(minimum=0), default=1e-6, help="learning rate at the start of the warm-up")
    a("--min-lr", type=in_range(minimum=0), default=1e-5, help="learning rate at the end of the cosine")
    a("--warmup-epochs", type=COUNT, default=5, help="epochs of linear warm-up")
    a("--sched-no-lag", action="store_true",
      help="epoch e trains at the schedule's lr(e); default (released): at lr(e - 1), epochs 0 and 1 at --warmup-lr")
    # augmentation
    a("--color-jitter", type=in_range(minimum=0), default=0.3,
      help="colour jitter strength (unused while RandAugment is on, as in timm)")
    a("--aa", type=str, default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy ('none': off)")
    a("--smoothing", type=UNIT_OPEN, default=0.1, help="label smoothing")
    a("--train-interpolation", type=str, default="bicubic", help="resize interpolation in training")
    a("--repeated-aug", action="store_true", default=True,
      help="repeated augmentation: each image 3 times per epoch on different ranks (released: on)")
    a("--no-repeated-aug", action="store_false", dest="repeated_aug", help="plain distributed sampling")
    a("--reprob", type=UNIT, default=0.25, help="random-erasing probability")
    a("--remode", type=str, default="pixel", help="random-erasing fill mode")
    a("--recount", type=POSITIVE, default=1, help="random-erasing boxes per image")
    a("--mixup", type=in_range(minimum=0), default=0.8, help="Mixup alpha (0: off)")
    a("--cutmix", type=in_range(minimum=0), default=1.0, help="CutMix alpha (0: off)")
    a("--cutmix-minmax", type=UNIT, nargs="+", default=None, help="CutMix box ratio range, instead of alpha")
    a("--mixup-prob", type=UNIT, default=1.0, help="probability of mixing a batch")
    a("--mixup-switch-prob", type=UNIT, default=0.5, help="probability of CutMix instead of Mixup when both are on")
    a("--mixup-mode", type=str, default="batch", choices=["batch", "pair", "elem"],
      help="mix per batch, pair or element")
    a("--mix-text", action="store_true", help="mix text embeddings like the images (a deviation)")
    a("--eval-crop-ratio", type=in_range(above=0, maximum=1), default=1.0,
      help="1.0 as released; 0.875 is DeiT's protocol")
    # distillation
    a("--teacher-model", default="regnety_160", type=str, help="timm model of the distillation teacher")
    a("--teacher-path", type=str, default="", help="local checkpoint of the teacher")
    a("--distillation-type", default="none", choices=["none", "soft", "hard"],
      help="knowledge distillation from the teacher (needs a distilled student model)")
    a("--distillation-alpha", default=0.5, type=UNIT, help="weight of the distillation loss")
    a("--distillation-tau", default=1.0, type=in_range(above=0), help="temperature of soft distillation")
    a("--finetune", "--pretrained", default="", metavar="PATH",
      help="initialise from weights on disk (timm state dict, .safetensors, or our checkpoint; head dropped if its "
           "class count differs, position embedding resampled); 'cache': timm's weights of --model from the Hugging "
           "Face cache, never downloaded")
    # data and run
    a("--data-path", default=None, type=str, help="ImageFolder root (train/, val/) or CIFAR root; default: generated")
    a("--data-set", default="IMNET", choices=["IMNET", "CIFAR"], type=str, help="IMNET: any ImageFolder")
    a("--nb-classes", type=at_least(2), default=1000, help="generated data only")
    a("--generated-size", type=POSITIVE, nargs=2, default=[1281, 500], metavar=("TRAIN", "VAL"),
      help="generated data: images in train and val")
    a("--output_dir", "--output-dir", default="./outputs", dest="output_dir",
      help="checkpoints, log.txt, args.json, tensorboard/")
    a("--seed", default=0, type=COUNT, help="seed of the initial weights, the data order and every augmentation")
    a("--resume", default="", help="checkpoint to resume from (default: output_dir/checkpoint.pth)")
    a("--start_epoch", default=0, type=COUNT,
      help="epoch to start a new run at (a resume takes it from the checkpoint)")
    a("--eval", action="store_true", help="evaluate --resume only")
    a("--dist-eval", action="store_true", default=True, help="kept for DeiT's command lines: evaluation is "
                                                             "always distributed and counts each image once")
    a("--num_workers", default=10, type=COUNT, help="data-loading workers per process")
    a("--pin-mem", action="store_true", default=True, help="pinned host memory for the loaders (on GPUs)")
    a("--no-pin-mem", action="store_false", dest="pin_mem", help="no pinned memory")
    a("-p", "--print-freq", type=POSITIVE, default=10, help="log every N steps")
    # GPT4Image
    a("--text_emb", default="imagenet_clip_text_emb_0_1281166.pth", help="'none' trains the baseline")
    a("--proj_type", default="mlp", choices=["mlp", "linear"],
      help="projection head: MLP (Linear-ReLU-Linear) or one Linear")
    a("--loss_type", default="clip", choices=LOSS_TYPES,
      help="alignment loss: clip (symmetric InfoNCE over the global batch), ctr (image to text), byol (the paper's); "
           "cos, l2, kl, dist, sigmoid (SigLIP), supcon, vl2lite-text (README: alignment losses)")
    a("--lamb", type=in_range(minimum=0), default=0.3, help="weight of the text-alignment loss")
    a("--tau", type=in_range(above=0), default=0.05, help="temperature of the clip/ctr/supcon losses")
    return add_common_args(p)


def schedule_position(epoch: int, no_lag: bool = False) -> int:
    """The scheduler time whose lr epoch ``epoch`` trains at. The release stepped timm's scheduler
    with ``step(e)`` after epoch e, so epoch e trains at lr(e - 1): epochs 0 and 1 both at the warm-up
    start, the peak first in epoch warmup + 1. ``no_lag``: epoch e trains at lr(e). The same
    function positions a resumed run, so resumed and uninterrupted runs train at the same lrs."""
    return epoch if no_lag else max(epoch - 1, 0)


def create_backbone(args, num_classes: int) -> torch.nn.Module:
    """``timm.create_model(--model)``: with ``img_size`` where the model takes it (ViTs), without it
    where it does not (convolutional networks adapt to any input size)."""
    if args.model not in timm.list_models():
        close = timm.list_models(f"*{args.model.split('_')[0]}*")[:5]
        raise UserError(f"--model {args.model!r} is not a timm model (timm {timm.__version__}); similar: {close}")
    kwargs = dict(pretrained=False, num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path)
    try:
        return timm.create_model(args.model, img_size=args.input_size, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        logger.info(f"{args.model} takes no img_size: built without it (it accepts {args.input_size} px as is)")
        return timm.create_model(args.model, **kwargs)


def build_model(args, num_classes: int, text_dim: int | None) -> TextAlignedModel:
    backbone = create_backbone(args, num_classes)
    if args.distillation_type != "none":
        if not hasattr(backbone, "set_distilled_training"):
            raise UserError(f"--distillation-type {args.distillation_type} needs a distilled student such as "
                            f"deit_base_distilled_patch16_224, not {args.model}")
        backbone.set_distilled_training(True)
    if getattr(backbone, "cls_token", None) is not None:
        # timm 0.3.2 (the release's) drew the class token from a truncated normal, std 0.02; timm 1.x
        # uses std 1e-6. Everything else of the backbone's initialisation is the same in both.
        torch.nn.init.trunc_normal_(backbone.cls_token, std=0.02)
    if args.finetune:
        path = cached_timm_weights(backbone, args.model) if args.finetune == "cache" else args.finetune
        load_pretrained(backbone, path)
    head = None
    if text_dim is not None:
        width = getattr(backbone, "head_hidden_size", None) or backbone.num_features  # of the pre-logits feature
        head = build_projection_head(args.proj_type, width, text_dim, batchnorm=False, init_std=0.02)
    return TextAlignedModel(backbone, head, alignment_state_for(args, text_dim))


def build_optimizer(args, model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    from timm.optim import param_groups_weight_decay
    skip = {f"backbone.{n}" for n in getattr(model.backbone, "no_weight_decay", lambda: set())()}
    groups = param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=skip)
    betas = tuple(args.opt_betas) if args.opt_betas else (0.9, 0.999)
    return torch.optim.AdamW(groups, lr=lr, eps=args.opt_eps, betas=betas, fused=device.type == "cuda")


def main(argv: list | None = None):
    return run_recipe(get_args_parser(), DeiTConfig, _run, argv)


def build_ema(model: torch.nn.Module, args) -> ModelEmaV3:
    """EMA of the whole wrapper (backbone and projection head): ema = decay * ema + (1 - decay) * model
    after every step, as DeiT's ModelEma, computed with timm's multi-tensor lerp (one kernel per
    group of tensors instead of four per tensor; benchmarks/train_step.py measures both)."""
    return ModelEmaV3(model, decay=args.model_ema_decay, device="cpu" if args.model_ema_force_cpu else None)


def build_sampler(args, train_set, dist_info) -> torch.utils.data.Sampler:
    if args.repeated_aug:
        return RASampler(train_set, dist_info.rank, dist_info.world_size, shuffle=True, seed=args.seed)
    return torch.utils.data.DistributedSampler(train_set, dist_info.world_size, dist_info.rank, shuffle=True,
                                               seed=args.seed)


def _run(cfg: DeiTConfig, dist_info):
    device = dist_info.device
    if cfg.amp_dtype is None and device.type == "cuda":
        cfg.amp_dtype = "float16"  # the released recipe always trained under fp16 autocast
    if cfg.eval and not cfg.resume:
        raise UserError("--eval needs --resume PATH (our checkpoint or a timm state dict)")
    state = adopt_checkpoint_settings(cfg, get_args_parser(), ["model", "input_size", "nb_classes"],
                                      RECIPE) if cfg.eval else None
    amp_dtype = start_run(cfg, dist_info)
    train_set, val_set, num_classes = build_datasets(cfg)
    train_set, embeddings = attach_text_embeddings(train_set, None if cfg.eval else cfg.text_emb,
                                                   cfg.data_path is None, cfg.text_per_step, cfg.seed,
                                                   None if cfg.eval else TrainingTargets.from_args(cfg, num_classes))
    val_set = attach_val_text_embeddings(val_set, cfg.val_text_emb, embeddings)
    eval_sets = build_eval_sets(cfg, run_classes(train_set, state), val_set, dist_info, int(1.5 * cfg.batch_size),
                                cfg.num_workers, cfg.pin_mem and device.type == "cuda")
    if cfg.skip_corrupt_images:
        train_set = SkipCorrupt(train_set)
    logger.info(f"evaluation: resize {int(cfg.input_size / cfg.eval_crop_ratio)}, centre crop {cfg.input_size} "
                f"(crop ratio {cfg.eval_crop_ratio})")

    seed_all(cfg.seed, device)
    model = build_model(cfg, num_classes, embeddings.dim if embeddings is not None else None).to(device)
    prepare_alignment_state(model, cfg, embeddings, cfg.output_dir)
    pin = cfg.pin_mem and device.type == "cuda"
    val_loader = build_eval_loader(val_set, dist_info, int(1.5 * cfg.batch_size), cfg.num_workers, pin)
    if cfg.eval:
        return evaluate_checkpoint(model, state, cfg.resume, val_loader, Evaluation(
            device=device, amp_dtype=amp_dtype, prepare=DeviceAugment(), recipe=RECIPE, eval_sets=eval_sets))
    train_loader, sampler = build_train_loader(train_set, build_sampler(cfg, train_set, dist_info), cfg.batch_size,
                                               cfg.num_workers, pin, cfg.seed + 1000 * dist_info.rank)
    data = Data(train_set=train_set, train_loader=train_loader, sampler=sampler, val_loader=val_loader,
                eval_sets=eval_sets)
    return build_trainer(cfg, dist_info, model, data, embeddings, num_classes).fit()


def build_trainer(cfg: DeiTConfig, dist_info, model, data: Data, embeddings, num_classes: int) -> Trainer:
    """AdamW with DeiT's warm-up and cosine, Mixup/CutMix with smoothing (or BCE), EMA, distillation."""
    device = dist_info.device
    lr, lr_note = scaled_lr(cfg.lr, cfg.batch_size * dist_info.world_size * cfg.accum_iter, 512, cfg.unscale_lr,
                            "--unscale-lr")
    optimizer = build_optimizer(cfg, model, lr, device)
    scheduler = CosineLRScheduler(optimizer, t_initial=cfg.epochs, lr_min=cfg.min_lr, warmup_lr_init=cfg.warmup_lr,
                                  warmup_t=cfg.warmup_epochs, cycle_limit=1, t_in_epochs=True)
    warn_if_all_warmup(cfg.epochs, cfg.warmup_epochs, lr, cfg.warmup_lr,
                       [schedule_position(e, cfg.sched_no_lag) for e in range(cfg.epochs)], "--sched-no-lag")
    criterion, mix_fn = build_criterion(cfg, num_classes, device)
    return Trainer(config=cfg, dist_info=dist_info, data=data, name=RECIPE, arch=cfg.model, model=model,
                   optimizer=optimizer, scheduler=scheduler,
                   step_scheduler=lambda done: scheduler.step(schedule_position(done, cfg.sched_no_lag)),
                   criterion=criterion, scaler=torch.amp.GradScaler(device.type,
                                                                    enabled=cfg.autocast_dtype == torch.float16),
                   alignment=alignment_from_args(cfg, embeddings, dist_info.world_size),
                   text_dim=embeddings.dim if embeddings is not None else None,
                   train_prepare=DeviceAugment(cfg.reprob, cfg.remode, cfg.recount), eval_prepare=DeviceAugment(),
                   mix_fn=mix_fn, ema=build_ema(model, cfg) if cfg.model_ema else None,
                   ema_device=torch.device("cpu") if cfg.model_ema_force_cpu else None, clip_grad=cfg.clip_grad,
                   best_name="best_checkpoint.pth", classes=run_classes(data.train_set), lr_note=lr_note,
                   classifier_hint=f"timm.create_model('{cfg.model}', num_classes={num_classes}, "
                                   f"img_size={cfg.input_size}).load_state_dict(torch.load('classifier.pth'))",
                   log_extra={"n_parameters": sum(p.numel() for p in model.backbone.parameters() if p.requires_grad),
                              "eval_crop_ratio": cfg.eval_crop_ratio})


if __name__ == "__main__":
    script_exit(main, sys.argv[1:])
