"""Datasets and transforms of the DeiT recipe: ImageFolder (ImageNet or any), local CIFAR-100, generated."""
import torch
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.mixup import mixup_target
from timm.data.random_erasing import RandomErasing
from torchvision import datasets, transforms

from gpt4image.train.data import DeviceNormalize, build_image_folders, generated_datasets
from gpt4image.errors import UserError


class LocalCIFAR100(datasets.CIFAR100):
    """CIFAR-100 read from ``root/cifar-100-python`` as torchvision lays it out, never downloaded.

    torchvision's own check compares MD5 sums of the official archive; a local copy (or a file set
    written in the same format) only has to be present and readable.
    """

    train_list = [["train", None]]
    test_list = [["test", None]]
    meta = {**datasets.CIFAR100.meta, "md5": None}  # no MD5: presence and readability are checked


def build_transform(is_train: bool, args) -> transforms.Compose:
    """DeiT's transforms up to uint8 tensors; ToTensor's scaling, Normalize and (in training) random
    erasing run on the device, in ``DeviceAugment``: the loader ships a quarter of the bytes."""
    if is_train:
        aa = None if str(args.aa).lower() in ("", "none") else args.aa
        t = create_transform(input_size=args.input_size, is_training=True, color_jitter=args.color_jitter,
                             auto_augment=aa, interpolation=args.train_interpolation, re_prob=0.0)
        if args.input_size <= 32:  # as DeiT: small images get a padded random crop, not a resized one
            t.transforms[0] = transforms.RandomCrop(args.input_size, padding=4)
        assert type(t.transforms[-2]).__name__ in ("MaybeToTensor", "ToTensor"), t  # timm 1.x / 0.x
        assert type(t.transforms[-1]).__name__ == "Normalize", t
        t.transforms[-2:] = [transforms.PILToTensor()]
        return t
    size = int(args.input_size / args.eval_crop_ratio)
    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(args.input_size),
        transforms.PILToTensor(),
    ])


class DeviceAugment:
    """The end of DeiT's per-image pipeline, on a uint8 batch on the device: ToTensor's scaling and
    Normalize (the same numbers as on the CPU), then timm's RandomErasing image by image with the
    same settings and distribution as in the loader (its random draws come from the step's seed)."""

    def __init__(self, reprob=0.0, remode="pixel", recount=1):
        self.normalize = DeviceNormalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        self.erase = RandomErasing(reprob, mode=remode, max_count=recount, device="cpu") if reprob > 0 else None

    def __call__(self, images):
        images = self.normalize(images)
        if self.erase is not None:
            self.erase.device = images.device
            images = self.erase(images)
        return images


def build_datasets(args) -> tuple:
    """(train, val, number of classes) for --data-set / --data-path (generated data without a path)."""
    train_tf, val_tf = build_transform(True, args), build_transform(False, args)
    if args.data_path is None:
        train, val = generated_datasets(args.nb_classes, args.input_size, *args.generated_size, train_tf, val_tf)
        return train, val, args.nb_classes
    if args.data_set == "CIFAR":
        try:
            train = LocalCIFAR100(args.data_path, train=True, transform=train_tf, download=False)
            val = LocalCIFAR100(args.data_path, train=False, transform=val_tf, download=False)
        except RuntimeError as e:
            raise UserError(f"no CIFAR-100 under {args.data_path!r} ({e}); it must hold cifar-100-python/ "
                            f"with train, test and meta as torchvision writes them") from None
        return train, val, 100
    train, val = build_image_folders(args.data_path, train_tf, val_tf)
    return train, val, len(train.classes)


class TextMixup:
    """timm's Mixup/CutMix that can also mix the text embeddings (``--mix-text``, a deviation).

    The released recipe mixes images and labels only: image i stays aligned with its own
    description. With ``mix_text`` the rows are mixed with the same partner (the batch reversed)
    and the same lambda as the images, then renormalised to unit length.
    """

    def __init__(self, mix_text=False, **mixup_kwargs):
        from timm.data import Mixup
        self.mixup = Mixup(**mixup_kwargs)
        self.mix_text = mix_text

    def __call__(self, images, targets, text=None):
        m = self.mixup
        if m.mode == "elem":
            lam = m._mix_elem(images)
        elif m.mode == "pair":
            lam = m._mix_pair(images)
        else:
            lam = m._mix_batch(images)
        targets = mixup_target(targets, m.num_classes, lam, m.label_smoothing)
        if self.mix_text and text is not None:
            weight = lam if isinstance(lam, float) else lam.to(text.device).view(-1, 1)
            mixed = text.float() * weight + text.float().flip(0) * (1 - weight)
            text = torch.nn.functional.normalize(mixed, dim=-1)
        return images, targets, text
