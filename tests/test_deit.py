"""The DeiT recipe end to end on CPU with deit_tiny at 32 px (4 tokens of 16 px)."""
import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, ran, run_script

MAIN = os.path.join(REPO, "deit", "main.py")
TINY = ["--model", "deit_tiny_patch16_224", "--input-size", "32", "--batch-size", "8", "-p", "2", "--seed", "0"]
KEYS = {"epoch", "n_parameters", "lr", "train_lr", "train_loss", "train_ce_loss", "train_text_loss", "test_loss",
        "test_acc1", "test_acc5", "ema_test_acc1", "epoch_time_s", "images_per_s", "eval_crop_ratio"}


def _log(d):
    return [json.loads(line) for line in open(os.path.join(d, "log.txt"))]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "launch", "single"])
def test_two_epochs_with_ema_and_the_final_line(launcher, image_folder, embeddings, tmp_path):
    args = [MAIN, f"--data-path={image_folder}", f"--text_emb={embeddings}", f"--output_dir={tmp_path}",
            "--epochs=2", "--num_workers=1", *TINY]
    if launcher == "torchrun":
        cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    elif launcher == "launch":
        cmd = ["-m", "torch.distributed.launch", "--nproc_per_node=2", "--use_env", *args]
    else:  # one process: main(argv) in this one (fresh interpreters run the recipes in many other tests)
        cmd = args
    proc = (ran if launcher == "single" else run_script)(cmd, cwd=os.path.join(REPO, "deit"))
    log = _log(tmp_path)
    assert [r["epoch"] for r in log] == [0, 1]
    for r in log:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["eval_crop_ratio"] == 1.0
    last = proc.stdout.strip().splitlines()[-1]
    assert "(raw)" in last and "(EMA)" in last and "final" in last
    assert "crop ratio 1.0" in proc.stdout
    world = 1 if launcher == "single" else 2
    assert f"effective text-loss weight={0.3 / world:g}" in proc.stdout


def test_aligned_feature_is_the_class_token_after_the_final_norm():
    from gpt4image.recipes import deit as deit_main
    args = deit_main.get_args_parser().parse_args([*TINY, "--drop-path=0"])
    model = deit_main.build_model(args, 5, 16).eval()
    x = torch.randn(2, 3, 32, 32)
    b = model.backbone
    cls_token = b.forward_features(x)[:, 0]  # timm 1.x: all tokens, after the final norm
    torch.testing.assert_close(cls_token, b.forward_head(b.forward_features(x), pre_logits=True))
    model.train()
    _, projected = model(x)
    torch.testing.assert_close(projected, model.projection_head(cls_token))
    assert [type(m).__name__ for m in model.projection_head] == ["Linear", "ReLU", "Linear"]


def test_mixup_leaves_text_unmixed_by_default_and_mix_text_mixes_with_the_same_lambda():
    from gpt4image.recipes.deit_data import TextMixup
    torch.manual_seed(0)
    images = torch.zeros(4, 3, 8, 8)
    images[:, 0] = torch.arange(4.0).view(4, 1, 1)
    targets = torch.arange(4)
    text = F.normalize(torch.randn(4, 6), dim=-1)
    kwargs = dict(mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0, label_smoothing=0.0, num_classes=4)
    _, mixed_targets, same = TextMixup(**kwargs)(images.clone(), targets, text.clone())
    assert torch.equal(same, text)
    mixed_images, mixed_targets, mixed_text = TextMixup(mix_text=True, **kwargs)(images.clone(), targets, text.clone())
    lam = mixed_targets[0, 0].item()
    assert 0 < lam < 1
    torch.testing.assert_close(mixed_images[0, 0, 0, 0], torch.tensor(lam * 0 + (1 - lam) * 3))
    expected = F.normalize(lam * text + (1 - lam) * text.flip(0), dim=-1)
    torch.testing.assert_close(mixed_text, expected)


def test_automatic_resume_equals_an_uninterrupted_run(image_folder, embeddings, tmp_path):
    from gpt4image.recipes import deit as deit_main
    common = [f"--data-path={image_folder}", f"--text_emb={embeddings}", "--num_workers=0", *TINY, "--epochs=2"]
    deit_main.main([*common, f"--output_dir={tmp_path}/straight"])
    deit_main.main([*common, f"--output_dir={tmp_path}/resumed", "--stop-after=1"])
    deit_main.main([*common, f"--output_dir={tmp_path}/resumed"])
    a, b = torch.load(tmp_path / "straight" / "checkpoint.pth"), torch.load(tmp_path / "resumed" / "checkpoint.pth")
    for part in ("model", "projection_head", "model_ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    timing = {"epoch_time_s", "images_per_s"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(_log(tmp_path / "straight")) == strip(_log(tmp_path / "resumed"))


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_distillation_from_a_local_teacher_checkpoint(kind, image_folder, embeddings, tmp_path):
    import timm
    from gpt4image.recipes import deit as deit_main
    teacher = timm.create_model("resnet18", num_classes=4, global_pool="avg")
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    out = deit_main.main([f"--data-path={image_folder}", f"--text_emb={embeddings}", "--num_workers=0",
                          "--model", "deit_tiny_distilled_patch16_224", "--input-size", "32", "--batch-size", "8",
                          "--epochs=1", f"--output_dir={tmp_path}/run", "--teacher-model", "resnet18",
                          f"--teacher-path={tmp_path}/teacher.pth", f"--distillation-type={kind}"])
    log = _log(tmp_path / "run")
    assert len(log) == 1 and np.isfinite(log[0]["train_loss"]) and log[0]["train_text_loss"] > 0
    assert out["final_acc1"] is not None


def _write_cifar100(root, n_train=40, n_test=20):
    base = os.path.join(root, "cifar-100-python")
    os.makedirs(base)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {"data": rng.integers(0, 255, size=(n, 3072), dtype=np.uint8),
                 "fine_labels": list(rng.integers(0, 100, n)),
                 "coarse_labels": [0] * n, "filenames": [f"{i}.png" for i in range(n)]}
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump(entry, f)
    with open(os.path.join(base, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)], "coarse_label_names": ["c"]}, f)


def test_cifar100_from_local_files_with_text_embeddings(tmp_path):
    from gpt4image.recipes import deit as deit_main
    _write_cifar100(tmp_path / "cifar")
    torch.save(F.normalize(torch.randn(40, 32), dim=-1).half(), tmp_path / "emb.pth")
    deit_main.main(["--data-set=CIFAR", f"--data-path={tmp_path}/cifar", f"--text_emb={tmp_path}/emb.pth",
                    "--num_workers=0", *TINY, "--epochs=1", f"--output_dir={tmp_path}/run"])
    log = _log(tmp_path / "run")
    assert log[0]["test_num_images"] == 20 and log[0]["train_text_loss"] > 0


def test_classifier_export_loads_into_plain_timm(image_folder, tmp_path):
    import timm
    from gpt4image.recipes import deit as deit_main
    deit_main.main([f"--data-path={image_folder}", "--text_emb=none", "--num_workers=0", *TINY, "--epochs=1",
                    f"--output_dir={tmp_path}"])
    for name in ("classifier.pth", "classifier_ema.pth"):
        plain = timm.create_model("deit_tiny_patch16_224", num_classes=4, img_size=32)
        plain.load_state_dict(torch.load(tmp_path / name))
    stats = deit_main.main([f"--data-path={image_folder}", "--eval", f"--resume={tmp_path}/classifier.pth",
                            "--num_workers=0", *TINY])
    assert stats["num_images"] == 16 and stats["acc1"] == pytest.approx(_log(tmp_path)[0]["test_acc1"])


def test_defaults_are_the_released_deit_recipe():
    from gpt4image.recipes import deit as deit_main
    a = deit_main.get_args_parser().parse_args([])
    assert (a.model, a.epochs, a.batch_size, a.lr, a.weight_decay, a.opt_eps) == \
        ("deit_base_patch16_224", 300, 128, 5e-4, 0.05, 1e-8)
    assert (a.warmup_epochs, a.warmup_lr, a.min_lr, a.drop_path, a.model_ema_decay) == (5, 1e-6, 1e-5, 0.1, 0.99996)
    assert (a.aa, a.reprob, a.mixup, a.cutmix, a.mixup_switch_prob, a.smoothing) == \
        ("rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 0.5, 0.1)
    assert a.model_ema and a.repeated_aug and a.eval_crop_ratio == 1.0 and not a.mix_text
    assert (a.proj_type, a.loss_type, a.lamb, a.tau) == ("mlp", "clip", 0.3, 0.05)
    assert not a.sched_no_lag  # epoch e trains at lr(e - 1), as released
    assert deit_main.schedule_position(0) == deit_main.schedule_position(1) == 0 and deit_main.schedule_position(7) == 6
    assert sys.modules["gpt4image.recipes.deit"] is deit_main


def test_deit_train_transform_survives_many_draws_of_randaugment():
    # the recipe's RandAugment can posterize to 0 bits; a Pillow that refuses it would kill training
    import random
    from PIL import Image
    from gpt4image.recipes import deit as deit_main
    from gpt4image.recipes.deit_data import build_transform
    args = deit_main.get_args_parser().parse_args(["--input-size", "64"])
    transform = build_transform(True, args)
    image = Image.new("RGB", (80, 60), (120, 60, 200))
    for seed in range(400):
        random.seed(seed)
        torch.manual_seed(seed)
        assert transform(image).shape == (3, 64, 64)


def test_uint8_loader_and_device_augment_give_deits_inputs():
    """The loader ships uint8 tensors; DeviceAugment normalises (bit for bit as timm's transform does)
    and erases on the device: about a quarter of the images get one rectangle of noise, the rest of
    each image is untouched."""
    from PIL import Image
    from timm.data import create_transform
    from gpt4image.train.resumable import seed_all
    from gpt4image.recipes import deit as deit_main
    from gpt4image.recipes.deit_data import DeviceAugment, build_transform
    args = deit_main.get_args_parser().parse_args(["--input-size", "64"])
    ours = build_transform(True, args)
    timm_no_erasing = create_transform(input_size=64, is_training=True, color_jitter=args.color_jitter,
                                       auto_augment=args.aa, interpolation=args.train_interpolation, re_prob=0.0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    shipped, expected = [], []
    for seed in range(200):
        for transform, out in [(ours, shipped), (timm_no_erasing, expected)]:
            seed_all(seed)  # RandAugment draws from random and numpy.random
            out.append(transform(image))
    shipped, expected = torch.stack(shipped), torch.stack(expected)
    assert shipped.dtype == torch.uint8
    assert torch.equal(DeviceAugment()(shipped), expected)
    seed_all(0)
    erased = DeviceAugment(args.reprob, args.remode, args.recount)(shipped) != expected
    touched = erased.flatten(1).any(1)
    assert 0.15 < touched.float().mean() < 0.35  # --reprob 0.25
    for mask in erased[touched].any(1):  # one axis-aligned rectangle per erased image
        rows, cols = mask.any(1).nonzero().squeeze(1), mask.any(0).nonzero().squeeze(1)
        box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.float().mean() > 0.99 and mask.sum() == box.numel()


@pytest.mark.slow
def test_compiled_run_resumes_exactly_and_exports_plain_weights(image_folder, embeddings, tmp_path,
                                                                compile_without_codegen):
    """Under --compile too, drop-path and the other per-step randomness come from the step's seed:
    stopping after one epoch and continuing gives the weights of an uninterrupted run."""
    import timm
    from gpt4image.recipes import deit as deit_main
    # a loader worker: with none, every sample would reseed the main process and hide a missing step seed
    common = [f"--data-path={image_folder}", f"--text_emb={embeddings}", "--num_workers=1", *TINY, "--epochs=2",
              "--compile"]
    deit_main.main([*common, f"--output_dir={tmp_path}/straight"])
    deit_main.main([*common, f"--output_dir={tmp_path}/resumed", "--stop-after=1"])
    deit_main.main([*common, f"--output_dir={tmp_path}/resumed"])
    a, b = torch.load(tmp_path / "straight" / "checkpoint.pth"), torch.load(tmp_path / "resumed" / "checkpoint.pth")
    assert not any("_orig_mod" in k for k in a["model"])
    for part in ("model", "projection_head", "model_ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=4).load_state_dict(
        torch.load(tmp_path / "resumed" / "classifier.pth"))


def test_ema_is_decay_times_ema_plus_the_rest_times_the_model_after_each_step():
    from gpt4image.recipes import deit as deit_main
    args = deit_main.get_args_parser().parse_args(["--model-ema-decay", "0.9"])
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    ema = deit_main.build_ema(model, args)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        expected = {k: 0.9 * expected[k] + 0.1 * v for k, v in model.state_dict().items()}
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-6)
        assert not torch.equal(v, model.state_dict()[k])


def _released_lrs(epochs, warmup, lr, warmup_lr, min_lr, lag=True):
    """The lr each epoch trains at under the released loop (timm's cosine scheduler stepped with
    ``step(e)`` after epoch e), computed with timm's scheduler itself."""
    from timm.scheduler import CosineLRScheduler
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = CosineLRScheduler(opt, t_initial=epochs, lr_min=min_lr, warmup_lr_init=warmup_lr, warmup_t=warmup,
                                  cycle_limit=1, t_in_epochs=True)
    lrs = [opt.param_groups[0]["lr"]]  # epoch 0 trains at the scheduler's initial lr
    for epoch in range(epochs - 1):
        scheduler.step(epoch if lag else epoch + 1)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.slow
def test_lr_per_epoch_is_the_released_schedule_also_after_a_resume_and_no_lag_is_one_epoch_ahead(
        image_folder, embeddings, tmp_path):
    from gpt4image.recipes import deit as deit_main
    schedule = ["--epochs=5", "--warmup-epochs=2", "--lr=1e-3", "--unscale-lr", "--warmup-lr=1e-4", "--min-lr=1e-5"]
    common = [f"--data-path={image_folder}", "--text_emb=none", "--num_workers=0", *TINY, *schedule, "--no-model-ema",
              "--mixup=0", "--cutmix=0", "--aa=none", "--reprob=0"]
    released = _released_lrs(5, 2, 1e-3, 1e-4, 1e-5)
    # epochs 0 and 1 at the warm-up start, epoch 2 at lr(1), the second warm-up step
    assert released[0] == released[1] == 1e-4 and released[2] == pytest.approx(1e-4 + (1e-3 - 1e-4) / 2)
    deit_main.main([*common, f"--output_dir={tmp_path}/straight"])
    assert [r["lr"] for r in _log(tmp_path / "straight")] == pytest.approx(released, rel=1e-9)
    deit_main.main([*common, f"--output_dir={tmp_path}/resumed", "--stop-after=2"])
    deit_main.main([*common, f"--output_dir={tmp_path}/resumed"])
    assert [r["lr"] for r in _log(tmp_path / "resumed")] == pytest.approx(released, rel=1e-9)
    deit_main.main([*common, f"--output_dir={tmp_path}/no_lag", "--sched-no-lag", "--epochs=5", "--stop-after=2"])
    deit_main.main([*common, f"--output_dir={tmp_path}/no_lag", "--sched-no-lag"])
    ahead = _released_lrs(5, 2, 1e-3, 1e-4, 1e-5, lag=False)
    assert [r["lr"] for r in _log(tmp_path / "no_lag")] == pytest.approx(ahead, rel=1e-9) and ahead[1] > released[1]


def test_released_initialisation_class_token_std_and_uniform_head_biases():
    from gpt4image.recipes import deit as deit_main
    args = deit_main.get_args_parser().parse_args(["--model", "deit_small_patch16_224", "--input-size", "224"])
    torch.manual_seed(0)
    model = deit_main.build_model(args, 10, 512)
    assert 0.015 < model.backbone.cls_token.std().item() < 0.025  # timm 0.3.2's trunc_normal(std=0.02)
    for layer in (m for m in model.projection_head if isinstance(m, torch.nn.Linear)):
        bound = layer.in_features ** -0.5  # PyTorch's default: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert layer.bias.abs().max() <= bound and layer.bias.abs().max() > 0.5 * bound
        assert layer.bias.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.2)
