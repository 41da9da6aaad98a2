"""ResNet-50 on ImageNet-1k with the GPT4Image text-alignment loss (METHOD.md, "Recipes").

    cd resnet && torchrun --nproc_per_node=4 main.py --data=/path/to/imagenet --batch-size=256 \
        --text_emb=imagenet_clip_text_emb_0_1281166.pth --save_dir=./outputs

Also runs under ``python -m torch.distributed.launch --use_env``, ``srun`` and as one process
(GPU or CPU). Without ``--data`` it trains on generated images (as the original's FakeData).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gpt4image  # noqa: E402,F401  (first: makes torchvision importable)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torchvision  # noqa: E402
from torchvision import transforms  # noqa: E402

from gpt4image import (TextAlignedModel, build_projection_head,  # noqa: E402
                       init_distributed, save_checkpoint, setup_logging)
from gpt4image.distributed import cleanup, logger  # noqa: E402
from gpt4image.engine import DeviceNormalize, evaluate  # noqa: E402
from gpt4image.errors import UserError, exit_on_user_error  # noqa: E402
from gpt4image.io import atomic_torch_save  # noqa: E402
from gpt4image.recipe import (CHECKPOINT, RunRecord, SkipCorrupt, add_common_args, attach_text_embeddings,  # noqa: E402
                              build_eval_loader, build_image_folders, build_train_loader, checkpoint_state,
                              epoch_row, generated_datasets, load_classifier_weights, resume_run,
                              start_run, text_config, train_epoch, wrap_distributed)
from gpt4image.resumable import StopRequest, seed_all  # noqa: E402

RECIPE = "resnet"
ARCHS = sorted(name for name in torchvision.models.list_models(module=torchvision.models)
               if name.startswith(("resnet", "resnext", "wide_resnet")))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMALIZE = DeviceNormalize(MEAN, STD)


def get_args_parser():
    p = argparse.ArgumentParser("GPT4Image ResNet recipe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="ImageNet root with train/ and val/ (default: generated data)")
    p.add_argument("--save_dir", default="./outputs", help="checkpoints, log.txt, args.json, tensorboard/")
    p.add_argument("-a", "--arch", default="resnet50", choices=ARCHS)
    p.add_argument("-j", "--workers", type=int, default=8, help="data-loading workers per process")
    p.add_argument("--epochs", type=int, default=120)
    p.add_argument("--start-epoch", type=int, default=0)
    p.add_argument("-b", "--batch-size", type=int, default=256, help="per process")
    p.add_argument("--lr", type=float, default=0.1, help="for 256 images; scaled by W x batch / 256")
    p.add_argument("--no_scale_lr", action="store_true", help="use --lr as given")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", "--weight-decay", type=float, default=1e-4, dest="wd")
    p.add_argument("-p", "--print-freq", type=int, default=10)
    p.add_argument("--resume", default="", help="checkpoint to resume from (default: save_dir/checkpoint.pth)")
    p.add_argument("-e", "--evaluate", action="store_true", help="evaluate --resume on the validation set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--use_amp", action="store_true", help="autocast (float16 unless --amp-dtype)")
    p.add_argument("--text_emb", default="imagenet_clip_text_emb_0_1281166.pth",
                   help="embedding table from description2embedding.py; 'none' trains the baseline")
    p.add_argument("--proj_type", default="mlp", choices=["mlp", "linear"])
    p.add_argument("--loss_type", default="clip", choices=["clip", "ctr", "byol"])
    p.add_argument("--lamb", type=float, default=0.3, help="weight of the text-alignment loss")
    p.add_argument("--tau", type=float, default=0.2, help="temperature of the clip/ctr losses")
    p.add_argument("--sync_bn", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--input-size", type=int, default=224, help="train crop; eval resizes to size/0.875, crops size")
    p.add_argument("--min-lr", type=float, default=1e-5, help="end of the cosine schedule")
    p.add_argument("--num-classes", type=int, default=1000, help="generated data only (else from the folders)")
    p.add_argument("--generated-size", type=int, nargs=2, default=[1281, 500], metavar=("TRAIN", "VAL"),
                   help="generated data: images in train and val")
    return add_common_args(p)


def transforms_for(input_size):
    """The original's transforms up to uint8 tensors; ``NORMALIZE`` does ToTensor's scaling and
    Normalize on the device (same numbers, a quarter of the bytes through the loader)."""
    train = transforms.Compose([transforms.RandomResizedCrop(input_size), transforms.RandomHorizontalFlip(),
                                transforms.PILToTensor()])
    val = transforms.Compose([transforms.Resize(int(input_size / 0.875)), transforms.CenterCrop(input_size),
                              transforms.PILToTensor()])
    return train, val


def build_model(args, num_classes, text_dim):
    backbone = torchvision.models.__dict__[args.arch](num_classes=num_classes)
    head = None
    if text_dim is not None:
        in_dim = backbone.fc.in_features
        head = build_projection_head(args.proj_type, in_dim, text_dim, batchnorm=True, init_std=1024 ** -0.5)
    return TextAlignedModel(backbone, head)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    dist_info = init_distributed(args.local_rank, args.device)
    device = dist_info.device
    setup_logging(dist_info.is_main)
    try:
        return _run(args, dist_info, device)
    finally:
        cleanup()


def _run(args, dist_info, device):
    if args.use_amp and args.amp_dtype is None:
        args.amp_dtype = "float16"
    amp_dtype = start_run(args, dist_info)

    train_tf, val_tf = transforms_for(args.input_size)
    generated = args.data is None
    if generated:
        train_set, val_set = generated_datasets(args.num_classes, args.input_size, *args.generated_size, train_tf, val_tf)
        logger.info(f"no --data: generated images ({len(train_set)} train, {len(val_set)} val)")
    else:
        train_set, val_set = build_image_folders(args.data, train_tf, val_tf)
    num_classes = len(train_set.classes) if hasattr(train_set, "classes") and not generated else args.num_classes
    train_set, embeddings = attach_text_embeddings(train_set, None if args.evaluate else args.text_emb, generated)
    if args.skip_corrupt_images:
        train_set = SkipCorrupt(train_set)
    text_dim = embeddings.dim if embeddings is not None else None

    seed_all(args.seed, device)  # same initial weights on every rank
    model = build_model(args, num_classes, text_dim)
    n_parameters = sum(p.numel() for p in model.backbone.parameters())
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    val_loader = build_eval_loader(val_set, dist_info, args.batch_size, args.workers, torch.cuda.is_available())
    if args.evaluate:
        return _evaluate_only(args, model, val_loader, device, amp_dtype)

    record = RunRecord(args.save_dir, args, dist_info.is_main)
    text_cfg = text_config(args, embeddings, dist_info.world_size)

    lr = args.lr if args.no_scale_lr else args.lr * dist_info.world_size * args.batch_size / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.wd)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs, eta_min=args.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    best = {"acc1": -1.0, "epoch": -1}
    start_step, partial = 0, None

    resumed = resume_run(args.resume, args.save_dir, RECIPE, args.arch, text_dim, model, optimizer, scheduler, scaler,
                         record)
    if resumed:
        args.start_epoch, start_step, partial, best = resumed

    model_without_ddp = model  # SyncBN conversion keeps parameters: checkpoints hold model_without_ddp's
    model = wrap_distributed(model, dist_info, args.sync_bn)
    if args.sync_bn and dist_info.distributed:
        model_without_ddp = model.module
    train_model = torch.compile(model) if args.compile else model

    sampler = torch.utils.data.DistributedSampler(train_set, dist_info.world_size, dist_info.rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    train_loader, resumable = build_train_loader(train_set, sampler, args.batch_size, args.workers,
                                                 torch.cuda.is_available(), args.seed + 1000 * dist_info.rank)
    ce = nn.CrossEntropyLoss()
    test_stats = {}
    logger.info(f"training {args.arch} for {args.epochs} epochs on {dist_info.world_size} process(es), "
                f"{len(train_set)} images, lr {lr:g}")
    last_epoch = args.epochs if args.stop_after is None else min(args.epochs, args.start_epoch + args.stop_after)
    stop = StopRequest(dist_info.control_group)

    def make_state(epoch, **position):
        return checkpoint_state(RECIPE, args.arch, text_dim, epoch, best, model_without_ddp, optimizer, scheduler,
                                scaler, args, **position)

    for epoch in range(args.start_epoch, last_epoch):
        first = epoch == args.start_epoch
        train_stats = train_epoch(epoch, start_step if first else 0, partial if first else None, resumable,
                                  args.batch_size, make_state, args.save_dir, dist_info, stop,
                                  model=train_model, loader=train_loader, optimizer=optimizer, device=device,
                                  criterion=lambda _, logits, targets: ce(logits, targets), text=text_cfg,
                                  amp_dtype=amp_dtype, scaler=scaler, print_freq=args.print_freq,
                                  num_epochs=args.epochs, channels_last=args.channels_last, prepare=NORMALIZE,
                                  seed=args.seed + 1000 * dist_info.rank)
        scheduler.step()
        test_stats = evaluate(model_without_ddp, val_loader, device, amp_dtype, args.channels_last, NORMALIZE)
        logger.info(f"epoch {epoch}: test top-1 {test_stats['acc1']:.2f}% top-5 {test_stats['acc5']:.2f}% "
                    f"({test_stats['num_images']} images)")
        improved = test_stats["acc1"] > best["acc1"]
        if improved:
            best = {"acc1": test_stats["acc1"], "epoch": epoch}
        state = make_state(epoch)
        save_checkpoint(state, os.path.join(args.save_dir, CHECKPOINT), dist_info.is_main)
        if improved:
            save_checkpoint(state, os.path.join(args.save_dir, "best_model.pth.tar"), dist_info.is_main)
        record.log_epoch(epoch_row(epoch, train_stats, test_stats, train_set=train_set, n_parameters=n_parameters))
    record.close()
    stop.restore()
    if dist_info.is_main:
        classifier = os.path.join(args.save_dir, "classifier.pth")
        atomic_torch_save(model_without_ddp.backbone.state_dict(), classifier)
        logger.info(f"outputs in {os.path.abspath(args.save_dir)}: checkpoint.pth, best_model.pth.tar, "
                    f"classifier.pth (loads into torchvision.models.{args.arch}()), log.txt, args.json, tensorboard/")
    final = test_stats.get("acc1", float("nan"))
    logger.info(f"best top-1 {best['acc1']:.2f}% at epoch {best['epoch']}, final top-1 {final:.2f}%")
    return {"best": best, "final_acc1": final}


def _evaluate_only(args, model, val_loader, device, amp_dtype):
    if not args.resume:
        raise UserError("--evaluate needs --resume PATH (our checkpoint or a torchvision state dict)")
    from gpt4image.checkpoint import load_checkpoint
    load_classifier_weights(model.backbone, load_checkpoint(args.resume), args.resume)
    stats = evaluate(model, val_loader, device, amp_dtype, args.channels_last, NORMALIZE)
    logger.info(f"evaluation of {args.resume}: top-1 {stats['acc1']:.3f}% top-5 {stats['acc5']:.3f}% "
                f"loss {stats['loss']:.4f} over {stats['num_images']} images")
    return stats


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])
