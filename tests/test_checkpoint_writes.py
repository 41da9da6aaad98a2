"""Issue 25's checkpoints: one full write per epoch, the best as a hard link (a copy where links are
not supported), an evaluation recorded in a few bytes, resumed exactly; and the typed configs."""
import errno
import json
import os

import pytest
import torch

from gpt4image.recipes import deit, resnet
from gpt4image.recipes.configs import DeiTConfig, ResNetConfig
from gpt4image.train import checkpoint, checkpoints

TINY = ["-a", "resnet18", "-b", "16", "-j", "0", "--input-size=32", "--generated-size", "64", "16", "--num-classes=4",
        "--seed=0", "-p", "100", "--checkpoint-every-minutes=0"]


def _run(out, epochs, *extra):
    return resnet.main([*TINY, f"--epochs={epochs}", f"--text_emb={out}/none.pth", f"--save_dir={out}", *extra])


@pytest.fixture
def counted_saves(monkeypatch):
    written = []
    save = checkpoint.atomic_torch_save
    monkeypatch.setattr(checkpoint, "atomic_torch_save", lambda obj, path: (written.append(path), save(obj, path)))
    return written


def test_each_epoch_writes_its_state_once_and_the_best_is_a_link_to_that_epochs_file(tmp_path, counted_saves):
    result = _run(tmp_path, 3)
    assert len(counted_saves) == 3 and {os.path.basename(p) for p in counted_saves} == {"checkpoint.pth"}
    best_epoch = result["best"]["epoch"]
    best = torch.load(tmp_path / "best_model.pth.tar", weights_only=True)
    assert best["epoch"] == best_epoch  # the weights of the best epoch
    same_file = os.stat(tmp_path / "best_model.pth.tar").st_ino == os.stat(tmp_path / "checkpoint.pth").st_ino
    assert same_file == (best_epoch == 2)
    record = json.loads((tmp_path / "evaluated.json").read_text())
    assert record == {"epoch": 2, "best": result["best"]}


def test_a_run_stopped_before_its_evaluation_was_recorded_evaluates_that_epoch_once_on_resume(tmp_path, monkeypatch):
    from gpt4image.train.trainer import Trainer
    _run(tmp_path / "whole", 2)
    _run(tmp_path / "cut", 2)
    os.unlink(tmp_path / "cut" / "evaluated.json")  # as a kill right after the epoch's log row
    evaluated = []
    evaluate = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate", lambda self, epoch: (evaluated.append(epoch), evaluate(self, epoch))[1])
    result = _run(tmp_path / "cut", 2)
    assert evaluated == [1] and result["stopped"] is None
    whole, cut = ((tmp_path / d / "log.txt").read_text().splitlines() for d in ("whole", "cut"))
    assert [json.loads(r)["test_acc1"] for r in cut] == [json.loads(r)["test_acc1"] for r in whole]
    rerun = _run(tmp_path / "cut", 2)  # recorded now: nothing is evaluated again
    assert evaluated == [1] and rerun["final_acc1"] == result["final_acc1"] == json.loads(whole[-1])["test_acc1"]


@pytest.mark.parametrize("code", [errno.EXDEV, errno.EPERM])
def test_where_hard_links_are_refused_the_best_is_a_copy(tmp_path, monkeypatch, code):
    source, target = tmp_path / "checkpoint.pth", tmp_path / "best.pth"
    source.write_bytes(b"state of epoch 3")
    target.write_bytes(b"state of epoch 1")

    def refused(*args):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(checkpoints.os, "link", refused)
    checkpoints.link_or_copy(str(source), str(target))
    assert target.read_bytes() == b"state of epoch 3" and sorted(os.listdir(tmp_path)) == ["best.pth", "checkpoint.pth"]


def test_a_hard_link_survives_the_next_checkpoint_replacing_the_file(tmp_path):
    from gpt4image.io import atomic_torch_save
    atomic_torch_save({"epoch": 0}, str(tmp_path / "checkpoint.pth"))
    checkpoints.link_or_copy(str(tmp_path / "checkpoint.pth"), str(tmp_path / "best.pth"))
    atomic_torch_save({"epoch": 1}, str(tmp_path / "checkpoint.pth"))
    assert torch.load(tmp_path / "best.pth")["epoch"] == 0


@pytest.mark.parametrize("recipe, config", [(resnet, ResNetConfig), (deit, DeiTConfig)])
def test_each_flag_is_a_field_of_the_recipes_config_and_is_recorded_as_parsed(recipe, config):
    args = recipe.get_args_parser().parse_args([])
    recorded = config.from_args(args).recorded()
    assert {k: recorded[k] for k in vars(args)} == vars(args)
    args.a_flag_without_a_field = 1
    with pytest.raises(TypeError, match="a_flag_without_a_field"):
        config.from_args(args)
