"""What a researcher expects of the recipes: evaluation that reads the checkpoint, one run per folder,
--help with defaults, both flag spellings, any timm model, --pretrained, --accum-iter, -c config,
per-step TensorBoard scalars, the optional W&B dependency, and the classifier hint that works."""
import json
import os
from pathlib import Path
import subprocess
import sys

import pytest
import torch

from conftest import DEIT, REPO, RESNET, SMALL, built_once, ran, refused, run_script, snapshot

TINY = ["--model", "deit_tiny_patch16_224", "--input-size", "32", "--batch-size", "4", "--num_workers", "0"]


@pytest.fixture(scope="module")
def resnet_run(image_folder, embeddings, tmp_path_factory):
    def build(run):
        proc = ran([RESNET, f"--data={image_folder}", f"--text_emb={embeddings}", "--epochs=1", *SMALL,
                    f"--save_dir={run}"])
        return str(run), proc.stdout
    run, stdout = built_once(tmp_path_factory, "habits_resnet_run", build)
    return Path(run), stdout


def test_evaluation_takes_architecture_and_input_size_from_the_checkpoint(resnet_run, image_folder):
    run, _ = resnet_run
    proc = ran([RESNET, f"--data={image_folder}", "-e", f"--resume={run}/checkpoint.pth", "-j", "0"])
    assert "arch resnet18" in proc.stdout and "input_size 32" in proc.stdout
    logged = json.loads(open(run / "log.txt").read().splitlines()[-1])["test_acc1"]
    assert f"top-1 {logged:.3f}%" in proc.stdout  # the very figure of the run, at its own input size
    refused([RESNET, f"--data={image_folder}", "-e", f"--resume={run}/checkpoint.pth", "-a", "resnet34"],
            "resnet34", "resnet18", "leave the flag out")
    refused([RESNET, f"--data={image_folder}", "-e", f"--resume={run}/checkpoint.pth", "--input-size", "64"],
            "64", "32")


def test_the_classifier_hint_is_a_call_that_loads_the_classifier(resnet_run):
    run, stdout = resnet_run
    hint = next(line for line in stdout.splitlines() if "without any code of ours" in line)
    call = hint.split("without any code of ours: ", 1)[1].split(" (on a CPU-only", 1)[0]
    assert "num_classes=4" in call
    code = f"import gpt4image, torch, torchvision\n{call.replace('classifier.pth', str(run / 'classifier.pth'))}"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(run))


def test_a_rerun_with_other_arguments_is_refused_listing_them_and_resume_continues_anyway(image_folder, embeddings,
                                                                                        tmp_path):
    run = tmp_path / "run"
    base = [RESNET, f"--data={image_folder}", "--epochs=2", *SMALL, f"--save_dir={run}"]
    ran([*base, f"--text_emb={embeddings}", "--stop-after=1"])
    before = snapshot(run)
    err = refused([*base, f"--text_emb={embeddings}", "--lr", "0.5"], "lr 0.1 -> 0.5", "another output folder",
                  "--resume")
    assert "None" not in err
    err = refused([*base, "--text_emb=none"], "baseline")
    assert "None" not in err
    assert snapshot(run) == before
    proc = ran([*base, f"--text_emb={embeddings}", "--lr", "0.5", f"--resume={run}/checkpoint.pth"])
    assert "arguments differ" in proc.stdout + proc.stderr and "continuing at epoch 1" in proc.stdout


def test_a_finished_run_rerun_says_so_and_repeats_its_final_line(resnet_run, image_folder, embeddings):
    run, stdout = resnet_run
    before = snapshot(run)
    proc = ran([RESNET, f"--data={image_folder}", f"--text_emb={embeddings}", "--epochs=1", *SMALL,
                f"--save_dir={run}"])
    assert "holds a finished run of 1 epochs" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].split(" ", 1)[1] == stdout.strip().splitlines()[-1].split(" ", 1)[1]
    assert "nan" not in proc.stdout.strip().splitlines()[-1]
    assert snapshot(run) == before


def test_description2embedding_names_its_output_after_its_input(image_folder, tiny_clip, tmp_path):
    torch.save(["a description"] * 48, tmp_path / "my_descriptions.pth")
    proc = ran([os.path.join(REPO, "description2embedding.py"), "--caption=my_descriptions.pth",
                       f"--model={tiny_clip}", "--workers=0", "--quiet"], cwd=str(tmp_path))
    assert os.path.isfile(tmp_path / "my_descriptions_text_emb.pth")
    assert "my_descriptions_text_emb.pth" in proc.stdout


@pytest.mark.parametrize("main", [RESNET, DEIT])
def test_help_shows_every_default_and_both_spellings_parse(main):
    import importlib
    module = importlib.import_module("gpt4image.recipes.resnet" if "resnet" in main else "gpt4image.recipes.deit")
    parser = module.get_args_parser()
    assert parser.format_help().count("(default:") >= 25
    assert all(action.help for action in parser._actions), [a.option_strings for a in parser._actions if not a.help]
    both = ["--text-emb", "x", "--loss-type", "ctr"] + (["--save-dir", "d"] if "resnet" in main else
                                                        ["--output-dir", "d", "--num-workers", "3"])
    args = parser.parse_args(both)
    assert args.text_emb == "x" and args.loss_type == "ctr"


def test_a_config_file_sets_defaults_the_command_line_overrides_and_args_json_records(image_folder, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("arch: resnet18\nbatch-size: 4\nlr: 0.05\ninput_size: 32\ntext_emb: none\nepochs: 1\n")
    run = tmp_path / "run"
    ran([RESNET, "-c", str(config), f"--data={image_folder}", "--lr", "0.02", "-j", "0", f"--save_dir={run}"])
    args = json.load(open(run / "args.json"))
    assert (args["arch"], args["batch_size"], args["lr"], args["input_size"]) == ("resnet18", 4, 0.02, 32)
    config.write_text("lr: -1\n")
    refused([RESNET, "-c", str(config)], "run.yaml", "lr")
    config.write_text("learning_rate: 1\n")
    refused([RESNET, "-c", str(config)], "learning_rate", "not a flag")


def test_per_step_scalars_reach_tensorboard(resnet_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run, _ = resnet_run
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"step/loss", "step/text_loss", "step/lr", "step/images_per_s", "test_acc1"} <= set(tags)
    assert len(events.Scalars("step/loss")) >= 2  # every print step, not once per epoch


def test_wandb_is_optional_with_a_clear_error_when_absent(image_folder, tmp_path):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    refused([RESNET, f"--data={image_folder}", "--text_emb=none", *SMALL, "--wandb-project", "p",
             f"--save_dir={tmp_path}/out"], "pip install wandb")
    assert not os.path.exists(tmp_path / "out")


def test_any_timm_model_trains_in_the_deit_recipe_and_an_unknown_one_is_named(image_folder, embeddings, tmp_path):
    proc = ran([DEIT, f"--data-path={image_folder}", f"--text_emb={embeddings}", "--model", "resnet18",
                       "--input-size", "32", "--batch-size", "8", "--num_workers", "0", "--epochs", "1",
                       f"--output_dir={tmp_path}"])
    assert "takes no img_size" in proc.stdout and "final" in proc.stdout.strip().splitlines()[-1]
    refused([DEIT, "--model", "resnet_51", "--text_emb=none", f"--output_dir={tmp_path}/x"], "resnet_51",
            "not a timm model")


def test_pretrained_weights_initialise_the_backbone_and_a_head_of_another_class_count_is_dropped(image_folder,
                                                                                               tmp_path):
    import torchvision
    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=10)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    run = tmp_path / "run"
    proc = ran([RESNET, f"--data={image_folder}", "--text_emb=none", "--epochs=1", *SMALL, "--lr=1e-12",
                       "--no_scale_lr", "--momentum=0", "--wd=0", f"--pretrained={tmp_path}/r18.pth",
                       f"--save_dir={run}"])
    assert "dropping its classifier (fc.weight, fc.bias)" in proc.stdout
    trained = torch.load(run / "classifier.pth")
    torch.testing.assert_close(trained["conv1.weight"], source.state_dict()["conv1.weight"])  # lr ~ 0: unchanged
    assert trained["fc.weight"].shape == (4, 512)


def test_gradient_accumulation_equals_the_larger_batch(image_folder, tmp_path):
    from gpt4image.recipes import deit as deit_main
    plain = ["--text_emb=none", f"--data-path={image_folder}", "--model", "deit_tiny_patch16_224", "--input-size",
             "32", "--num_workers", "0", "--epochs", "1", "--no-model-ema", "--mixup=0", "--cutmix=0", "--aa=none",
             "--reprob=0", "--drop-path=0", "--smoothing=0", "--no-repeated-aug", "--seed=0"]
    deit_main.main([*plain, "--batch-size=8", f"--output_dir={tmp_path}/big"])
    deit_main.main([*plain, "--batch-size=4", "--accum-iter=2", f"--output_dir={tmp_path}/accumulated"])
    big, acc = torch.load(tmp_path / "big" / "classifier.pth"), torch.load(tmp_path / "accumulated" / "classifier.pth")
    for key in big:
        torch.testing.assert_close(acc[key], big[key], rtol=1e-4, atol=1e-5)
    rows = [json.loads(open(tmp_path / d / "log.txt").read()) for d in ("big", "accumulated")]
    assert rows[0]["lr"] == rows[1]["lr"]  # the lr scales with the effective batch


def test_retrieval_figures_are_those_of_the_pairs():
    from gpt4image.train.metrics import retrieval_metrics
    torch.manual_seed(0)
    texts = torch.nn.functional.normalize(torch.randn(300, 16), dim=1)
    perfect = retrieval_metrics(texts * 3, texts, chunk=64)  # any scale: features are normalised
    assert perfect["i2t_r1"] == perfect["t2i_r1"] == 100.0 and perfect["pair_cosine"] == pytest.approx(1.0)
    shuffled = retrieval_metrics(texts[torch.randperm(300)], texts, chunk=64)
    assert shuffled["i2t_r1"] < 5 and shuffled["i2t_r5"] < 10 and abs(shuffled["pair_cosine"]) < 0.2
    half = texts.clone()
    half[150:] = texts[torch.arange(150, 300).flip(0)]
    assert retrieval_metrics(half, texts)["i2t_r1"] == pytest.approx(50.0, abs=1)


@pytest.mark.slow
def test_val_text_emb_adds_retrieval_over_every_validation_image_once(image_folder, embeddings, tiny_clip, tmp_path):
    from gpt4image.synthetic import describe_image_folder
    texts, _ = describe_image_folder(os.path.join(image_folder, "val"))
    torch.save(texts, tmp_path / "val_captions.pth")
    ran([os.path.join(REPO, "description2embedding.py"), f"--caption={tmp_path}/val_captions.pth",
                f"--model={tiny_clip}", f"--data={image_folder}/val", f"--output={tmp_path}/val_emb.pth",
                "--workers=0", "--quiet"])
    run = tmp_path / "run"
    proc = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", RESNET,
                       f"--data={image_folder}", f"--text_emb={embeddings}", f"--val-text-emb={tmp_path}/val_emb.pth",
                       "--epochs=1", *SMALL, f"--save_dir={run}"])
    assert "image->text R@1" in proc.stdout
    row = json.loads(open(run / "log.txt").read())
    for key in ("test_i2t_r1", "test_i2t_r5", "test_t2i_r1", "test_t2i_r5"):
        assert 0 <= row[key] <= 100 and (row[key] / 6.25) == pytest.approx(round(row[key] / 6.25))  # over 16 images
    assert -1 <= row["test_pair_cosine"] <= 1
    report = ran(["-m", "gpt4image.report", str(run)]).stdout
    assert f"{row['test_i2t_r1']:.1f}/{row['test_t2i_r1']:.1f}" in report
    refused([RESNET, f"--data={image_folder}", "--text_emb=none", f"--val-text-emb={tmp_path}/val_emb.pth",
             *SMALL, f"--save_dir={tmp_path}/x"], "--val-text-emb", "--text_emb")


def test_pretrained_cache_takes_the_library_weights_from_their_local_caches_only(image_folder, tmp_path,
                                                                                monkeypatch):
    import torchvision
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    refused([RESNET, f"--data={image_folder}", "--text_emb=none", *SMALL, "--pretrained=cache",
             f"--save_dir={tmp_path}/a"], "not in", os.path.basename(url), "--pretrained PATH")
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(2)
    weights = torchvision.models.resnet18().state_dict()  # 1000 classes, as torchvision's
    torch.save(weights, tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(url))
    from gpt4image.recipes import resnet as resnet_main
    args = resnet_main.get_args_parser().parse_args([*SMALL, "--pretrained=cache"])
    model = resnet_main.build_model(args, 4, None)
    torch.testing.assert_close(model.backbone.layer1[0].conv1.weight, weights["layer1.0.conv1.weight"])

    from gpt4image.recipes import deit as deit_main
    import huggingface_hub.constants
    from safetensors.torch import save_file
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    args = deit_main.get_args_parser().parse_args([*TINY, "--pretrained=cache"])
    with pytest.raises(Exception, match="not in the Hugging Face cache"):
        deit_main.build_model(args, 4, None)
    import timm
    repo = timm.create_model("deit_tiny_patch16_224", pretrained=False).pretrained_cfg["hf_hub_id"]
    snapshot_dir = tmp_path / "hf" / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc"
    snapshot_dir.mkdir(parents=True)
    (snapshot_dir.parent.parent / "refs").mkdir()
    (snapshot_dir.parent.parent / "refs" / "main").write_text("abc")
    source = timm.create_model("deit_tiny_patch16_224", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in source.items()}, str(snapshot_dir / "model.safetensors"))
    model = deit_main.build_model(args, 4, None)
    torch.testing.assert_close(model.backbone.blocks[0].attn.qkv.weight, source["blocks.0.attn.qkv.weight"])
