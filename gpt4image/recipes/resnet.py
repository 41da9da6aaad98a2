"""ResNet-50 on ImageNet-1k with the GPT4Image text-alignment loss (arXiv 2306.00693).

    cd resnet && torchrun --nproc_per_node=4 main.py --data=/path/to/imagenet --batch-size=256 \\
        --text_emb=imagenet_clip_text_emb_0_1281166.pth --save_dir=./outputs

Also runs under ``python -m torch.distributed.launch --use_env``, ``srun`` and as one process
(GPU or CPU). Without ``--data`` it trains on generated images (as the original's FakeData).
"""
import sys

import gpt4image  # noqa: F401  (first: makes torchvision importable)
import torch
import torch.nn as nn
import torchvision
from torchvision import transforms

from gpt4image import TextAlignedModel, build_projection_head
from gpt4image.train.checkpoint import cached_torchvision_weights, load_pretrained
from gpt4image.train.data import (DeviceNormalize, SkipCorrupt, attach_text_embeddings, attach_val_text_embeddings,
                            build_eval_loader, build_image_folders, build_train_loader, generated_datasets)
from gpt4image.log import logger
from gpt4image.errors import UserError
from gpt4image.cli import ArgumentParser, at_least, in_range
from gpt4image.train.eval_sets import build_eval_sets, run_classes
from gpt4image.train.losses import LOSS_TYPES
from gpt4image.recipes.configs import ResNetConfig
from gpt4image.train.eval_only import Evaluation, adopt_checkpoint_settings, evaluate_checkpoint
from gpt4image.train.launch import run_recipe, script_exit
from gpt4image.train.options import (add_common_args, alignment_from_args, alignment_state_for, prepare_alignment_state,
                                     start_run)
from gpt4image.train.resumable import seed_all
from gpt4image.train.run_checks import scaled_lr
from gpt4image.train.text_targets import TrainingTargets
from gpt4image.train.trainer import Data, Trainer

RECIPE = "resnet"
COUNT, POSITIVE = at_least(0), at_least(1)
ARCHS = sorted(name for name in torchvision.models.list_models(module=torchvision.models)
               if name.startswith(("resnet", "resnext", "wide_resnet")))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMALIZE = DeviceNormalize(MEAN, STD)


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser("GPT4Image ResNet recipe", description=__doc__)
    p.add_argument("--data", default=None, help="ImageNet root with train/ and val/ (default: generated data)")
    p.add_argument("--save_dir", default="./outputs", help="checkpoints, log.txt, args.json, tensorboard/")
    p.add_argument("-a", "--arch", default="resnet50", choices=ARCHS, metavar="ARCH",
                   help="torchvision ResNet / ResNeXt / Wide-ResNet: " + ", ".join(ARCHS))
    p.add_argument("-j", "--workers", type=COUNT, default=8, help="data-loading workers per process")
    p.add_argument("--epochs", type=POSITIVE, default=120, help="training epochs (the cosine schedule spans them all)")
    p.add_argument("--start-epoch", type=COUNT, default=0,
      help="epoch to start a new run at (a resume takes it from the checkpoint)")
    p.add_argument("-b", "--batch-size", type=POSITIVE, default=256, help="per process")
    p.add_argument("--lr", type=in_range(above=0), default=0.1, help="for 256 images; scaled by W x batch / 256")
    p.add_argument("--no_scale_lr", action="store_true", help="use --lr as given")
    p.add_argument("--momentum", type=in_range(minimum=0, below=1), default=0.9, help="SGD momentum")
    p.add_argument("--wd", "--weight-decay", type=in_range(minimum=0), default=1e-4, dest="wd",
      help="SGD weight decay (on every parameter, as released)")
    p.add_argument("-p", "--print-freq", type=POSITIVE, default=10, help="log every N steps")
    p.add_argument("--pretrained", default="", metavar="PATH",
                   help="initialise from weights on disk (a torchvision state dict or our checkpoint; fc dropped if "
                        "its class count differs); 'cache': torchvision's weights of -a from torch hub's cache, never "
                        "downloaded")
    p.add_argument("--resume", default="", help="checkpoint to resume from (default: save_dir/checkpoint.pth)")
    p.add_argument("-e", "--evaluate", action="store_true", help="evaluate --resume on the validation set")
    p.add_argument("--seed", type=COUNT, default=0,
      help="seed of the initial weights, the data order and every augmentation")
    p.add_argument("--use_amp", action="store_true", help="autocast (float16 unless --amp-dtype)")
    p.add_argument("--text_emb", default="imagenet_clip_text_emb_0_1281166.pth",
                   help="embedding table from description2embedding.py; 'none' trains the baseline")
    p.add_argument("--proj_type", default="mlp", choices=["mlp", "linear"],
      help="projection head: MLP (Linear-BN-ReLU-Linear) or one Linear")
    p.add_argument("--loss_type", default="clip", choices=LOSS_TYPES,
      help="alignment loss: clip (symmetric InfoNCE over the global batch), ctr (image to text), byol (the paper's); "
           "cos, l2, kl, dist, sigmoid (SigLIP), supcon, vl2lite-text (README: alignment losses)")
    p.add_argument("--lamb", type=in_range(minimum=0), default=0.3, help="weight of the text-alignment loss")
    p.add_argument("--tau", type=in_range(above=0), default=0.2, help="temperature of the clip/ctr/supcon losses")
    p.add_argument("--sync_bn", action="store_true",
      help="synchronise BatchNorm statistics across GPUs (released: per GPU)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format (faster on tensor cores)")
    p.add_argument("--input-size", type=at_least(8), default=224,
      help="train crop; eval resizes to size/0.875, crops size")
    p.add_argument("--min-lr", type=in_range(minimum=0), default=1e-5, help="end of the cosine schedule")
    p.add_argument("--num-classes", type=at_least(2), default=1000, help="generated data only (else from the folders)")
    p.add_argument("--generated-size", type=POSITIVE, nargs=2, default=[1281, 500], metavar=("TRAIN", "VAL"),
                   help="generated data: images in train and val")
    return add_common_args(p)


def transforms_for(input_size: int) -> tuple:
    """The original's transforms up to uint8 tensors; ``NORMALIZE`` does ToTensor's scaling and
    Normalize on the device (same numbers, a quarter of the bytes through the loader)."""
    train = transforms.Compose([transforms.RandomResizedCrop(input_size), transforms.RandomHorizontalFlip(),
                                transforms.PILToTensor()])
    val = transforms.Compose([transforms.Resize(int(input_size / 0.875)), transforms.CenterCrop(input_size),
                              transforms.PILToTensor()])
    return train, val


def build_model(args, num_classes: int, text_dim: int | None) -> TextAlignedModel:
    backbone = torchvision.models.__dict__[args.arch](num_classes=num_classes)
    if args.pretrained:
        path = cached_torchvision_weights(args.arch) if args.pretrained == "cache" else args.pretrained
        load_pretrained(backbone, path)
    head = None
    if text_dim is not None:
        in_dim = backbone.fc.in_features
        head = build_projection_head(args.proj_type, in_dim, text_dim, batchnorm=True, init_std=1024 ** -0.5)
    return TextAlignedModel(backbone, head, alignment_state_for(args, text_dim))


def main(argv: list | None = None):
    return run_recipe(get_args_parser(), ResNetConfig, _run, argv)


def build_data(args, dist_info) -> tuple:
    """(train set with its embeddings, val set, number of classes, TextEmbeddings or None)."""
    train_tf, val_tf = transforms_for(args.input_size)
    generated = args.data is None
    if generated:
        train_set, val_set = generated_datasets(args.num_classes, args.input_size, *args.generated_size,
                                                train_tf, val_tf)
        logger.info(f"no --data: generated images ({len(train_set)} train, {len(val_set)} val)")
        num_classes = args.num_classes
    else:
        train_set, val_set = build_image_folders(args.data, train_tf, val_tf)
        num_classes = len(train_set.classes)
    targets = None if args.evaluate else TrainingTargets.from_args(args, num_classes)
    train_set, embeddings = attach_text_embeddings(train_set, None if args.evaluate else args.text_emb, generated,
                                                   args.text_per_step, args.seed, targets)
    val_set = attach_val_text_embeddings(val_set, args.val_text_emb, embeddings)
    if args.skip_corrupt_images:
        train_set = SkipCorrupt(train_set)
    return train_set, val_set, num_classes, embeddings


def _run(cfg: ResNetConfig, dist_info):
    if cfg.use_amp and cfg.amp_dtype is None:
        cfg.amp_dtype = "float16"
    if cfg.evaluate and not cfg.resume:
        raise UserError("--evaluate needs --resume PATH (our checkpoint or a torchvision state dict)")
    state = adopt_checkpoint_settings(cfg, get_args_parser(), ["arch", "input_size", "num_classes"],
                                      RECIPE) if cfg.evaluate else None
    amp_dtype = start_run(cfg, dist_info)
    train_set, val_set, num_classes, embeddings = build_data(cfg, dist_info)
    eval_sets = build_eval_sets(cfg, run_classes(train_set, state), val_set, dist_info, cfg.batch_size, cfg.workers,
                                torch.cuda.is_available())
    text_dim = embeddings.dim if embeddings is not None else None
    seed_all(cfg.seed, dist_info.device)  # same initial weights on every rank
    model = build_model(cfg, num_classes, text_dim).to(dist_info.device)
    prepare_alignment_state(model, cfg, embeddings, cfg.save_dir)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    pin = torch.cuda.is_available()
    val_loader = build_eval_loader(val_set, dist_info, cfg.batch_size, cfg.workers, pin)
    if cfg.evaluate:
        return evaluate_checkpoint(model, state, cfg.resume, val_loader, Evaluation(
            device=dist_info.device, amp_dtype=amp_dtype, channels_last=cfg.channels_last, prepare=NORMALIZE,
            recipe=RECIPE, eval_sets=eval_sets))
    sampler = torch.utils.data.DistributedSampler(train_set, dist_info.world_size, dist_info.rank, shuffle=True,
                                                  seed=cfg.seed, drop_last=True)
    train_loader, resumable = build_train_loader(train_set, sampler, cfg.batch_size, cfg.workers, pin,
                                                 cfg.seed + 1000 * dist_info.rank)
    data = Data(train_set=train_set, train_loader=train_loader, sampler=resumable, val_loader=val_loader,
                eval_sets=eval_sets)
    return build_trainer(cfg, dist_info, model, data, embeddings).fit()


def build_trainer(cfg: ResNetConfig, dist_info, model, data: Data, embeddings) -> Trainer:
    """SGD with momentum, a cosine schedule stepped once per epoch, cross-entropy (and the alignment)."""
    lr, lr_note = scaled_lr(cfg.lr, dist_info.world_size * cfg.batch_size * cfg.accum_iter, 256, cfg.no_scale_lr,
                            "--no_scale_lr")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.wd)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.min_lr)

    def step_scheduler(epochs_done):  # one step per epoch; a resumed scheduler is already in place
        while scheduler.last_epoch < epochs_done:
            scheduler.step()

    ce = nn.CrossEntropyLoss()
    num_classes = model.backbone.fc.out_features
    return Trainer(config=cfg, dist_info=dist_info, data=data, name=RECIPE, arch=cfg.arch, model=model,
                   optimizer=optimizer, scheduler=scheduler, step_scheduler=step_scheduler,
                   criterion=lambda _, logits, targets: ce(logits, targets),
                   scaler=torch.amp.GradScaler(dist_info.device.type, enabled=cfg.autocast_dtype == torch.float16),
                   alignment=alignment_from_args(cfg, embeddings, dist_info.world_size),
                   text_dim=embeddings.dim if embeddings is not None else None, train_prepare=NORMALIZE,
                   eval_prepare=NORMALIZE, sync_bn=cfg.sync_bn, channels_last=cfg.channels_last,
                   best_name="best_model.pth.tar", classes=run_classes(data.train_set), lr_note=lr_note,
                   classifier_hint=f"torchvision.models.{cfg.arch}(num_classes={num_classes})"
                                   f".load_state_dict(torch.load('classifier.pth'))",
                   log_extra={"n_parameters": sum(p.numel() for p in model.backbone.parameters())})


if __name__ == "__main__":
    script_exit(main, sys.argv[1:])
