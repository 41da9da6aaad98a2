"""The optimizer step's guard: a non-finite loss stops the run naming its step (or, with --nonfinite skip,
the step is skipped and counted), the gradient norm logged, the per-step axis in samples seen, and no
host read-back per step."""
import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from gpt4image.errors import exit_on_user_error
from gpt4image.train import epoch as epoch_module
from gpt4image.train.epoch import Reporting, train_one_epoch
from gpt4image.train.step import TrainStep

SMALL = ["-a", "resnet18", "-b", "4", "--input-size", "32", "-j", "0", "--seed", "0", "--epochs=2"]
STEPS = 12  # 48 training images of the conftest folder, batch 4, one process


def _poison(monkeypatch, calls_to_poison):
    """NaN in the loss of the given train_step calls (0-based, counted in this process)."""
    real, calls = epoch_module.train_step, []

    def poisoned(step, batch, first=True, update=True):
        calls.append(None)
        if len(calls) - 1 not in calls_to_poison:
            return real(step, batch, first, update)
        criterion = step.criterion
        step.criterion = lambda *a: criterion(*a) * float("nan")
        try:
            return real(step, batch, first, update)
        finally:
            step.criterion = criterion

    monkeypatch.setattr(epoch_module, "train_step", poisoned)


def _log(run):
    return [json.loads(line) for line in open(os.path.join(run, "log.txt"))]


def test_a_nan_loss_stops_the_run_naming_its_step_with_exit_2_and_the_checkpoint_keeps_finite_weights(
        monkeypatch, capsys, image_folder, embeddings, tmp_path):
    from gpt4image.recipes import resnet
    run = tmp_path / "run"
    # -p 100: the only read-back of epoch 1 is the one before its checkpoint, 10 steps after the NaN
    common = [f"--data={image_folder}", f"--text_emb={embeddings}", *SMALL, "-p", "100", f"--save_dir={run}"]
    resnet.main([*common, "--stop-after=1"])
    before = (run / "checkpoint.pth").read_bytes()
    _poison(monkeypatch, {2})
    with pytest.raises(SystemExit) as stopped:
        exit_on_user_error(resnet.main, common)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"non-finite total loss (nan) at epoch 1, step 3/{STEPS}" in err, err
    assert (run / "checkpoint.pth").read_bytes() == before
    model = torch.load(run / "checkpoint.pth")["model"]
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())
    assert len(_log(run)) == 1


def test_with_skip_a_nan_loss_is_skipped_counted_and_the_run_finishes(monkeypatch, image_folder, embeddings,
                                                                       tmp_path):
    from gpt4image.recipes import resnet
    run = tmp_path / "run"
    _poison(monkeypatch, {2, STEPS + 5})
    resnet.main([f"--data={image_folder}", f"--text_emb={embeddings}", *SMALL, "-p", "4", "--nonfinite", "skip",
                 f"--save_dir={run}"])
    rows = _log(run)
    assert [r["train_skipped_steps"] for r in rows] == [1, 1]
    assert all(r["train_grad_norm"] > 0 and math.isfinite(r["train_loss"]) for r in rows)
    model = torch.load(run / "checkpoint.pth")["model"]
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


def _batches(count=6, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 5, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(count)]


def _linear(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(5, 3)


def _step(model, optimizer, nonfinite="stop", poisoned=(), **extra):
    """A TrainStep of ``model`` whose loss is NaN on the batches whose first input is in ``poisoned``."""
    def criterion(images, logits, targets):
        loss = F.cross_entropy(logits, targets)
        return loss * float("nan") if any(torch.equal(images, p) for p in poisoned) else loss
    return TrainStep(model=model, optimizer=optimizer, criterion=criterion, device=torch.device("cpu"),
                     nonfinite=nonfinite, **extra)


@pytest.mark.parametrize("optimizer", ["sgd", "fused_adamw"])
def test_skipped_steps_leave_the_weights_as_if_their_batches_were_never_trained_on(optimizer):
    def make(model):
        if optimizer == "sgd":  # momentum and weight decay: a skipped step must not touch them either
            return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        return torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)  # found_inf: skipped on the device

    batches = _batches(8)
    bad = {1, 5}
    skipping = _linear()
    stats = train_one_epoch(_step(skipping, make(skipping), "skip", [batches[i][0] for i in bad]), batches, 0)
    clean = _linear()
    train_one_epoch(_step(clean, make(clean)), [b for i, b in enumerate(batches) if i not in bad], 0)
    untouched = _linear()
    assert stats["skipped_steps"] == len(bad)
    assert all(torch.equal(a, b) for a, b in zip(skipping.state_dict().values(), clean.state_dict().values()))
    assert not torch.equal(skipping.weight, untouched.weight)


def _hand_grad_norms(model, batches):
    """The L2 norm of d(mean cross-entropy)/d(weight, bias) of each batch, worked out by hand."""
    w, b = model.weight.detach().double(), model.bias.detach().double()
    norms = []
    for x, y in batches:
        x = x.double()
        g = (torch.softmax(x @ w.t() + b, dim=1) - F.one_hot(y, 3).double()) / len(x)
        norms.append(torch.sqrt((g.t() @ x).square().sum() + g.sum(0).square().sum()).item())
    return norms


@pytest.mark.parametrize("setting", ["plain", "clipped", "scaled", "scaled_fused"])
def test_the_logged_gradient_norm_is_that_of_the_unscaled_gradient_before_clipping(setting):
    from gpt4image.train.run_record import epoch_row
    model, batches = _linear(), _batches(5)
    expected = sum(_hand_grad_norms(model, batches)) / len(batches)
    extra = {}
    if setting == "clipped":
        extra["clip_grad"] = 1e-3
    if setting.startswith("scaled"):
        extra["scaler"] = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0, fused=setting == "scaled_fused")
    seen = []
    stats = train_one_epoch(_step(model, optimizer, **extra), batches, 0,
                            reporting=Reporting(print_freq=len(batches), sink=lambda x, s: seen.append(s)))
    row = epoch_row(0, stats, {"acc1": 0.0})
    assert row["train_grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert seen[-1]["step/grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert row["train_skipped_steps"] == 0


def test_the_step_axis_counts_samples_so_one_process_and_two_ranks_with_the_same_global_batch_agree(
        image_folder, embeddings, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    script = os.path.join(REPO, "resnet", "main.py")
    args = [f"--data={image_folder}", f"--text_emb={embeddings}", "-a", "resnet18", "--input-size", "32", "-j", "0",
            "--seed", "0", "--epochs=2", "-p", "2"]
    launch = {"one": [sys.executable, script, "-b", "8"],
              "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
                      "-b", "4"]}
    axes = {}
    for name, cmd in launch.items():
        subprocess.run([*cmd, *args, f"--save_dir={tmp_path / name}"], check=True, capture_output=True, env=env,
                       cwd=REPO, timeout=600)
        events = EventAccumulator(glob.glob(str(tmp_path / name / "tensorboard"))[0])
        events.Reload()
        axes[name] = [e.step for e in events.Scalars("step/loss")]
    per_epoch = 48 // 8
    expected = [(epoch * per_epoch + step) * 8 for epoch in range(2) for step in range(2, per_epoch + 1, 2)]
    assert axes["one"] == axes["two"] == expected


class _Reads:
    """Counts the ways a tensor's value reaches the host."""
    NAMES = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))

    def _counting(self, method):
        def counted(tensor, *a, **k):
            self.count += 1
            return method(tensor, *a, **k)
        return counted


@pytest.mark.parametrize("nonfinite,optimizer", [("stop", "sgd"), ("skip", "fused_adamw"), ("stop", "clipped")])
def test_no_value_is_read_back_per_step_between_log_lines(monkeypatch, nonfinite, optimizer):
    def reads(steps):
        model = _linear()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True) if optimizer == "fused_adamw" \
            else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        step = _step(model, opt, nonfinite, clip_grad=1.0 if optimizer == "clipped" else None)
        counter = _Reads(monkeypatch)
        train_one_epoch(step, _batches(steps), 0, reporting=Reporting(print_freq=1000))
        monkeypatch.undo()
        return counter.count

    assert reads(4) == reads(12) > 0  # the reads of the epoch's end only, however many steps


def test_skip_with_an_optimizer_that_cannot_skip_by_itself_reads_one_flag_per_step(monkeypatch):
    def reads(steps):
        model = _linear()
        step = _step(model, torch.optim.SGD(model.parameters(), lr=0.1), "skip")
        counter = _Reads(monkeypatch)
        train_one_epoch(step, _batches(steps), 0, reporting=Reporting(print_freq=1000))
        monkeypatch.undo()
        return counter.count

    assert reads(12) - reads(4) == 8
