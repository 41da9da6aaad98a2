"""The ResNet recipe end to end on CPU: launchers, learning, resume, baseline, evaluation, export."""
import json
import os
import sys

import pytest
import torch

from conftest import D2E, REPO, built_once, ran, run_script
from gpt4image.synthetic import make_image_folder

MAIN = os.path.join(REPO, "resnet", "main.py")
LOG_KEYS = {"epoch", "lr", "train_loss", "train_ce_loss", "train_text_loss", "train_acc1", "test_loss", "test_acc1",
            "test_acc5", "epoch_time_s", "images_per_s"}
SMALL = ["-a", "resnet18", "-b", "8", "--input-size", "32", "-p", "2", "--seed", "0"]


def _log(save_dir):
    return [json.loads(line) for line in open(os.path.join(save_dir, "log.txt"))]


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "launch", "single"])
def test_two_epochs_log_every_key_and_print_the_final_line(launcher, image_folder, embeddings, tmp_path):
    args = [MAIN, f"--data={image_folder}", f"--text_emb={embeddings}", f"--save_dir={tmp_path}", "--epochs=2",
            "-j", "1", *SMALL]
    if launcher == "torchrun":
        cmd = _torchrun(*args)
    elif launcher == "launch":
        cmd = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2", "--use_env", *args]
    else:  # one process: main(argv) in this one (fresh interpreters run the recipes in many other tests)
        cmd = [sys.executable, *args]
    proc = (ran if launcher == "single" else run_script)(cmd[1:], cwd=os.path.join(REPO, "resnet"))
    log = _log(tmp_path)
    assert [row["epoch"] for row in log] == [0, 1]
    for row in log:
        assert LOG_KEYS <= set(row), LOG_KEYS - set(row)
        assert row["train_text_loss"] > 0
    last = proc.stdout.strip().splitlines()[-1]
    assert "best top-1" in last and "final top-1" in last
    world = 1 if launcher == "single" else 2
    assert f"world_size={world} effective text-loss weight={0.3 / world:g}" in proc.stdout
    assert json.load(open(tmp_path / "args.json"))["arch"] == "resnet18"


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    def build(root):
        make_image_folder(str(root), num_classes=4, train_per_class=48, val_per_class=12, size=32, seed=1)
        return str(root)
    return built_once(tmp_path_factory, "learnable", build)


@pytest.mark.slow
@pytest.mark.parametrize("text", [True, False])
def test_a_learnable_dataset_is_learned_with_and_without_text_alignment(text, learnable, tiny_clip, tmp_path):
    text_emb = "none"
    if text:
        from gpt4image.synthetic import describe_image_folder
        texts, _ = describe_image_folder(os.path.join(learnable, "train"))
        torch.save(texts, tmp_path / "c.pth")
        text_emb = str(tmp_path / "emb.pth")
        ran([D2E, f"--caption={tmp_path}/c.pth", f"--model={tiny_clip}", f"--output={text_emb}",
             f"--data={learnable}/train", "--workers=0", "--quiet"])
    ran([MAIN, f"--data={learnable}", f"--text_emb={text_emb}", f"--save_dir={tmp_path}/run", "--epochs=4",
         "-j", "0", "-a", "resnet18", "-b", "16", "--input-size", "32", "--lr", "0.2", "--no_scale_lr"],
        cwd=os.path.join(REPO, "resnet"))
    best = max(row["test_acc1"] for row in _log(f"{tmp_path}/run"))
    assert best >= 60.0, f"4 classes (chance 25%): best top-1 {best}"


def test_resume_after_one_epoch_equals_two_straight_epochs(image_folder, embeddings, tmp_path):
    from gpt4image.recipes import resnet as resnet_main
    common = [f"--data={image_folder}", f"--text_emb={embeddings}", "-j", "0", *SMALL]
    resnet_main.main([*common, f"--save_dir={tmp_path}/straight", "--epochs=2"])
    resnet_main.main([*common, f"--save_dir={tmp_path}/resumed", "--epochs=2", "--stop-after=1"])
    out = resnet_main.main([*common, f"--save_dir={tmp_path}/resumed", "--epochs=2"])  # picks up checkpoint.pth
    assert out is not None
    a = torch.load(tmp_path / "straight" / "checkpoint.pth")
    b = torch.load(tmp_path / "resumed" / "checkpoint.pth")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["projection_head"]:
        assert torch.equal(a["projection_head"][k], b["projection_head"][k]), k
    timing = {"epoch_time_s", "images_per_s"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(_log(tmp_path / "straight")) == strip(_log(tmp_path / "resumed"))


def test_baseline_evaluate_and_plain_torchvision_export(image_folder, tmp_path):
    import torchvision
    from gpt4image.recipes import resnet as resnet_main
    resnet_main.main([f"--data={image_folder}", "--text_emb=none", "-j", "0", *SMALL, f"--save_dir={tmp_path}",
                      "--epochs=1"])
    log = _log(tmp_path)
    assert log[0]["train_text_loss"] == 0.0
    ckpt = torch.load(tmp_path / "checkpoint.pth")
    assert ckpt["projection_head"] is None
    plain = torchvision.models.resnet18(num_classes=4)
    plain.load_state_dict(torch.load(tmp_path / "classifier.pth"))  # no code of ours needed
    stats = resnet_main.main([f"--data={image_folder}", "-e", f"--resume={tmp_path}/classifier.pth", "-j", "0",
                              *SMALL])
    assert stats["num_images"] == 16  # exactly the validation set
    assert stats["acc1"] == pytest.approx(log[0]["test_acc1"])


def test_default_hyperparameters_are_the_papers():
    from gpt4image.recipes import resnet as resnet_main
    args = resnet_main.get_args_parser().parse_args([])
    assert (args.arch, args.epochs, args.batch_size, args.lr, args.momentum, args.wd) == \
        ("resnet50", 120, 256, 0.1, 0.9, 1e-4)
    assert (args.proj_type, args.loss_type, args.lamb, args.tau, args.min_lr) == ("mlp", "clip", 0.3, 0.2, 1e-5)
    assert args.input_size == 224 and not args.use_amp and not args.sync_bn and not args.no_scale_lr
    assert args.text_emb == "imagenet_clip_text_emb_0_1281166.pth"
    assert not args.gather_with_grad and not args.local_loss
    head = resnet_main.build_model(args, 10, 1024).projection_head  # released: PyTorch's default bias init
    assert head[-1].bias.abs().min() > 0 and head[-1].bias.abs().max() <= head[-1].in_features ** -0.5


def test_uint8_loader_and_device_normalisation_give_the_original_inputs(image_folder):
    """The loader ships uint8 crops and the device normalises them: the model must see exactly the
    tensors of the original's RandomResizedCrop/flip/ToTensor/Normalize on the same random draws."""
    from gpt4image.recipes import resnet as resnet_main
    from PIL import Image
    from torchvision import transforms
    normalize = transforms.Normalize(resnet_main.MEAN, resnet_main.STD)
    ours_train, ours_val = resnet_main.transforms_for(32)
    original_train = transforms.Compose([*ours_train.transforms[:-1], transforms.ToTensor(), normalize])
    original_val = transforms.Compose([*ours_val.transforms[:-1], transforms.ToTensor(), normalize])
    path = os.path.join(image_folder, "train", sorted(os.listdir(os.path.join(image_folder, "train")))[0])
    image = Image.open(os.path.join(path, sorted(os.listdir(path))[0])).convert("RGB")
    for ours, original in [(ours_train, original_train), (ours_val, original_val)]:
        for seed in range(5):
            torch.manual_seed(seed)
            shipped = ours(image)
            torch.manual_seed(seed)
            expected = original(image)
            assert shipped.dtype == torch.uint8
            assert torch.equal(resnet_main.NORMALIZE(shipped[None]), expected[None])


@pytest.mark.slow
def test_compiled_training_matches_eager_and_its_checkpoint_resumes_without_compile(image_folder, embeddings,
                                                                                    tmp_path, compile_without_codegen):
    import torchvision
    from gpt4image.recipes import resnet as resnet_main
    common = [f"--data={image_folder}", f"--text_emb={embeddings}", "-j", "0", *SMALL, "--epochs=2"]
    resnet_main.main([*common, f"--save_dir={tmp_path}/eager", "--stop-after=1"])
    resnet_main.main([*common, f"--save_dir={tmp_path}/compiled", "--stop-after=1", "--compile"])
    eager, compiled = _log(tmp_path / "eager")[0], _log(tmp_path / "compiled")[0]
    # the first steps agree to ~1e-5; with BatchNorm over 8 images at 32 px, kernel-order differences
    # then grow to about 1 % over an epoch (plain eager-vs-compiled resnet18 does the same)
    for key in ["train_loss", "train_ce_loss", "train_text_loss"]:
        assert compiled[key] == pytest.approx(eager[key], rel=0.05), key
    assert compiled["train_text_loss"] > 0
    state = torch.load(tmp_path / "compiled" / "checkpoint.pth")["model"]
    assert not any("_orig_mod" in k for k in state)  # plain keys, not the compiled wrapper's
    resnet_main.main([*common, f"--save_dir={tmp_path}/compiled"])  # resumes, eager
    assert [row["epoch"] for row in _log(tmp_path / "compiled")] == [0, 1]
    torchvision.models.resnet18(num_classes=4).load_state_dict(torch.load(tmp_path / "compiled" / "classifier.pth"))


@pytest.mark.slow
def test_two_ranks_report_the_top1_and_loss_of_the_checkpoint_rank_0_saves(image_folder, embeddings, tmp_path):
    # each rank's last training step leaves its own BatchNorm statistics; the saved model has rank 0's
    run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", MAIN, f"--data={image_folder}",
                f"--text_emb={embeddings}", "--epochs=1", f"--save_dir={tmp_path}", "-j", "0", *SMALL],
               cwd=os.path.join(REPO, "resnet"))
    logged = _log(tmp_path)[-1]
    from gpt4image.recipes import resnet as resnet_main
    alone = resnet_main.main([f"--data={image_folder}", "-e", f"--resume={tmp_path}/checkpoint.pth", "-j", "0",
                              *SMALL])
    assert alone["acc1"] == pytest.approx(logged["test_acc1"])
    assert alone["loss"] == pytest.approx(logged["test_loss"], rel=1e-5)


def test_projection_head_biases_keep_pytorchs_default_uniform_initialisation():
    from gpt4image.recipes import resnet as resnet_main
    args = resnet_main.get_args_parser().parse_args(["-a", "resnet50"])
    torch.manual_seed(0)
    head = resnet_main.build_model(args, 10, 1024).projection_head
    last = [m for m in head if isinstance(m, torch.nn.Linear)][-1]
    bound = last.in_features ** -0.5
    assert last.bias.abs().max() <= bound and last.bias.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.2)
    assert [m for m in head if isinstance(m, torch.nn.Linear)][0].bias is None  # BatchNorm follows it, as released
