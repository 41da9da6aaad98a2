"""The alignment-loss family: each loss against a loop reference, the 2-rank gradient contract of
every loss with negatives, the weight schedules, the standardisation, SigLIP's learned scalars in
the checkpoint, exact accumulation, and the combinations that are refused."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import alignment_references as ref
from conftest import REPO
from gpt4image.train.alignment import Alignment
from gpt4image.train.alignment_state import AlignmentState
from gpt4image.train.losses import LOSS_TYPES, LOSSES, alignment_loss
from gpt4image.train.text_weight import parse_schedule
from gpt4image.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
NEW = ["cos", "l2", "kl", "dist", "sigmoid", "supcon", "vl2lite-text"]


def _batch(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, d, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    t[4] = t[1]  # two images with the same text row: positives of each other under supcon
    labels = torch.tensor([0, 1, 0, 2, 3, 2])[:n]
    return z, t, labels


@pytest.mark.parametrize("loss_type", NEW)
def test_each_new_loss_and_its_gradient_equal_a_loop_reference(loss_type):
    z, t, labels = _batch()
    extra = {}
    if loss_type == "sigmoid":  # away from the initial values, so that both scalars matter
        extra = {"log_scale": torch.tensor(1.3, dtype=torch.float64, requires_grad=True),
                 "bias": torch.tensor(-0.7, dtype=torch.float64, requires_grad=True)}
    mine = alignment_loss(z, t, loss_type, tau=0.3, labels=labels, **extra)
    mine_grads = torch.autograd.grad(mine, [z, *extra.values()])
    theirs = ref.REFERENCES[loss_type](z, t, tau=0.3, labels=labels, **extra)
    their_grads = torch.autograd.grad(theirs, [z, *extra.values()])
    # alignment_loss computes in float32 (as under autocast); the references in float64
    assert mine.item() == pytest.approx(theirs.item(), rel=2e-5, abs=1e-6)
    for a, b in zip(mine_grads, their_grads):
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-6)


def test_the_papers_three_losses_are_unchanged_and_clip_is_the_default():
    z, t, labels = _batch()
    assert Alignment().loss_type == "clip" and LOSS_TYPES[:3] == ("clip", "ctr", "byol")
    assert alignment_loss(z, t, "clip", 0.3).item() == pytest.approx(ref.clip(z, t, 0.3).item(), rel=1e-5)


def test_siglip_starts_at_the_papers_temperature_and_bias():
    state = AlignmentState("sigmoid", 8)
    assert state.log_scale.exp().item() == pytest.approx(10.0) and state.bias.item() == -10.0
    assert {n for n, _ in state.named_parameters()} == {"log_scale", "bias"}


def test_supcon_positives_are_the_same_class_or_the_same_text_row():
    z, t, _ = _batch()
    distinct = torch.arange(6)
    # with every class distinct, rows 1 and 4 (identical text) are still positives of each other
    merged = alignment_loss(z, t, "supcon", 0.3, labels=distinct).item()
    t_apart = t.clone()
    t_apart[4] = F.normalize(t[4] + 1e-3, dim=0)
    apart = alignment_loss(z, t_apart, "supcon", 0.3, labels=distinct).item()
    assert merged == pytest.approx(ref.supcon(z, t, 0.3, distinct).item(), rel=1e-5)
    assert apart == pytest.approx(ref.supcon(z, t_apart, 0.3, distinct).item(), rel=1e-5)
    assert abs(merged - apart) > 0.05


@pytest.mark.slow
def test_ddp_gradient_of_every_loss_with_negatives_equals_one_process(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(HERE, "dist", "loss_gradients.py"), str(out)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) == {f"{loss}/{mode}" for loss in ref.WITH_NEGATIVES for mode in ("gather_with_grad", "default")}
    assert set(ref.WITH_NEGATIVES) == {name for name, spec in LOSSES.items() if spec.negatives}
    for key, difference in report.items():
        assert difference < 1e-6, (key, difference)


# --- schedules ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("const", lambda e: 0.3),
    ("linear", lambda e: 0.3 * (10 - e) / 10),
    ("cosine", lambda e: 0.3 * math.cos(math.pi * e / 20)),
    ("warmup:4", lambda e: 0.3 * min(1, e / 4)),
    ("jump:2-6-0.1", lambda e: 0.3 if e <= 2 else 0.03 if e >= 6 else 0.3 + (0.03 - 0.3) * (e - 2) / 4),
    ("jump:3-3-2", lambda e: 0.3 if e <= 3 else 0.6),
])
def test_the_weight_at_chosen_epochs_and_steps_is_its_formula(spec, expected):
    per_epoch, per_step = parse_schedule(spec, 10, "epoch"), parse_schedule(spec, 10, "step")
    for epoch in (0, 1, 2, 3, 5, 6, 9):
        assert per_epoch.weight(0.3, epoch, step=7, steps=8) == pytest.approx(expected(epoch), abs=1e-12)
        for step in (0, 3, 7):
            assert per_step.weight(0.3, epoch, step, 8) == pytest.approx(expected(epoch + step / 8), abs=1e-12)


@pytest.mark.parametrize("spec, message", [("cosin", "not a schedule"), ("jump:5-2-0.1", "A <= B"),
                                           ("jump:1-2", "3 number"), ("warmup:0", "> 0"), ("warmup:x", "number"),
                                           ("const:3", "not a schedule")])
def test_a_bad_schedule_is_refused(spec, message):
    with pytest.raises(UserError, match=message):
        parse_schedule(spec, 10)


# --- standardisation ----------------------------------------------------------------------------

def test_standardisation_statistics_are_the_tables_per_dimension_mean_and_std():
    g = torch.Generator().manual_seed(0)
    table = (torch.randn(1000, 6, generator=g) * torch.arange(1, 7) + 3).half()
    state = AlignmentState("clip", 6, standardize=True)
    state.set_text_statistics(table, chunk_rows=128)  # by chunks
    rows = table.double()
    for d in range(6):
        column = [float(v) for v in rows[:, d]]
        mean = sum(column) / len(column)
        std = math.sqrt(sum((v - mean) ** 2 for v in column) / (len(column) - 1))
        assert state.text_mean[d].item() == pytest.approx(mean, rel=1e-6)
        assert state.text_std[d].item() == pytest.approx(std, rel=1e-6)
    t = table[:4].float()
    torch.testing.assert_close(state.standardized(t, unit=False), (t - state.text_mean) / state.text_std)
    assert torch.allclose(state.standardized(t, unit=True).norm(dim=1), torch.ones(4))


def test_retrieval_compares_the_projection_with_standardised_rows_when_training_did():
    from gpt4image.train.evaluate import evaluate
    g = torch.Generator().manual_seed(0)
    texts = F.normalize(torch.randn(12, 6, generator=g) + 3, dim=1)  # a large common component, as CLIP's
    state = AlignmentState("clip", 6, standardize=True)
    state.set_text_statistics(texts)

    class Aligned(torch.nn.Module):  # a head that learnt the standardised rows exactly
        def __init__(self):
            super().__init__()
            self.projection_head, self.alignment_state = torch.nn.Identity(), state

        def logits_and_projection(self, x):
            return torch.zeros(len(x), 2), state.standardized(texts[x[:, 0].long()], unit=True)

    batches = [(torch.arange(k, k + 4).float()[:, None], torch.zeros(4, dtype=torch.long), texts[k:k + 4])
               for k in range(0, 12, 4)]
    found = evaluate(Aligned(), batches, torch.device("cpu"))
    assert found["pair_cosine"] == pytest.approx(1.0) and found["i2t_r1"] == 100.0


# --- the recipes: schedules in log.txt and TensorBoard, SigLIP's scalars and the statistics resumed ----

SMALL = ["-a", "resnet18", "-b", "8", "--input-size", "32", "-j", "0", "--seed", "0", "-p", "1"]
DEIT_PLAIN = ["--model", "deit_tiny_patch16_224", "--input-size", "32", "--num_workers", "0", "--epochs", "1",
              "--no-model-ema", "--mixup=0", "--cutmix=0", "--aa=none", "--reprob=0", "--drop-path=0", "--smoothing=0",
              "--no-repeated-aug", "--seed=0"]


def _log(folder):
    return [json.loads(line) for line in open(os.path.join(folder, "log.txt"))]


def _step_scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def test_sigmoid_standardised_per_step_schedule_is_learned_kept_and_resumed_exactly(image_folder, embeddings,
                                                                                    tmp_path):
    from gpt4image.recipes import resnet as resnet_main
    from gpt4image import load_text_embeddings
    common = [f"--data={image_folder}", f"--text_emb={embeddings}", *SMALL, "--epochs=2", "--loss_type=sigmoid",
              "--text-emb-standardize", "--text-weight-schedule=linear", "--text-weight-every=step"]
    resnet_main.main([*common, f"--save_dir={tmp_path}/straight"])
    resnet_main.main([*common, f"--save_dir={tmp_path}/resumed", "--stop-after=1"])
    resnet_main.main([*common, f"--save_dir={tmp_path}/resumed"])
    a, b = torch.load(tmp_path / "straight" / "checkpoint.pth"), torch.load(tmp_path / "resumed" / "checkpoint.pth")
    for part in ("model", "projection_head", "alignment_state"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    state = a["alignment_state"]
    assert state["log_scale"].item() != pytest.approx(math.log(10), abs=1e-6)  # optimised
    assert state["bias"].item() != pytest.approx(-10.0, abs=1e-6)
    table = load_text_embeddings(embeddings).table.double()
    torch.testing.assert_close(state["text_mean"].double(), table.mean(dim=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["text_std"].double(), table.std(dim=0), rtol=1e-5, atol=1e-6)
    steps = 48 // 8
    weight = lambda position: 0.3 * (2 - position) / 2  # noqa: E731  (linear, per step)
    timing = {"epoch_time_s", "images_per_s"}
    straight, resumed = ([{k: v for k, v in r.items() if k not in timing} for r in _log(tmp_path / d)]
                         for d in ("straight", "resumed"))
    assert straight == resumed
    assert [r["train_text_weight"] for r in straight] == pytest.approx(
        [weight(e + (steps - 1) / steps) for e in range(2)], abs=1e-12)
    for run in ("straight", "resumed"):
        scalars = _step_scalars(tmp_path / run, "step/text_weight")
        assert sorted(scalars) == [8 * s for s in range(1, 2 * steps + 1)]  # x: images seen (batch 8, 1 process)
        for seen, value in scalars.items():
            epoch, step = divmod(seen // 8 - 1, steps)
            assert value == pytest.approx(weight(epoch + step / steps), rel=1e-6)


def test_supcon_under_mixup_takes_the_unmixed_labels(image_folder, embeddings, tmp_path):
    from gpt4image.recipes import deit as deit_main
    from gpt4image.recipes.deit_data import DeviceAugment, TextMixup
    from gpt4image.train.step import TrainStep, train_step

    seen = []

    class Recording(Alignment):
        def loss(self, image_features, text_embeddings, labels=None, state=None, live_parameters=True):
            seen.append(labels.clone())
            return super().loss(image_features, text_embeddings, labels, state, live_parameters)

    args = deit_main.get_args_parser().parse_args([*DEIT_PLAIN, "--loss_type=supcon"])
    model = deit_main.build_model(args, 4, 8)
    mix = TextMixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=4)
    criterion, _ = deit_main.build_criterion(deit_main.get_args_parser().parse_args(["--loss_type=supcon"]), 4, "cpu")
    step = TrainStep(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=criterion,
                     device=torch.device("cpu"), alignment=Recording("supcon", 0.05), mix_fn=mix,
                     prepare=DeviceAugment())
    labels = torch.tensor([0, 1, 2, 3])
    values, _, _ = train_step(step, (torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8), labels,
                                     F.normalize(torch.randn(4, 8), dim=-1)))
    assert torch.equal(seen[0], labels) and torch.isfinite(values).all()


# --- exact accumulation ------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", ["clip", "supcon"])
def test_one_process_batch_b_accumulating_2_equals_batch_2b(loss_type, image_folder, embeddings, tmp_path):
    from gpt4image.recipes import deit as deit_main
    plain = [f"--text_emb={embeddings}", f"--data-path={image_folder}", *DEIT_PLAIN, f"--loss_type={loss_type}",
             "--warmup-epochs=0", "--unscale-lr", "--lr=1e-4",  # not the warm-up's 1e-6: the weights move
             "--opt-eps=1e-6"]  # AdamW's first steps turn gradients of rounding size into +-lr; not these
    deit_main.main([*plain, "--batch-size=8", f"--output_dir={tmp_path}/big"])
    deit_main.main([*plain, "--batch-size=4", "--accum-iter=2", f"--output_dir={tmp_path}/exact"])
    big, exact = (torch.load(tmp_path / d / "checkpoint.pth") for d in ("big", "exact"))
    for part in ("model", "projection_head"):
        for key in big[part]:
            torch.testing.assert_close(exact[part][key], big[part][key], rtol=1e-4, atol=1e-5)
    rows = [_log(tmp_path / d)[0] for d in ("big", "exact")]
    assert rows[1]["train_text_loss"] == pytest.approx(rows[0]["train_text_loss"], rel=1e-5)  # over 8, not 4
    if loss_type == "clip":  # the property is not trivial: per-batch negatives give other weights
        deit_main.main([*plain, "--batch-size=4", "--accum-iter=2", "--accum-alignment=per-batch",
                        f"--output_dir={tmp_path}/per_batch"])
        per_batch = torch.load(tmp_path / "per_batch" / "checkpoint.pth")
        assert _log(tmp_path / "per_batch")[0]["train_text_loss"] < 0.9 * rows[0]["train_text_loss"]
        assert not all(torch.allclose(per_batch["model"][k], big["model"][k], rtol=1e-4, atol=1e-5)
                       for k in big["model"])


def _accumulation_runs(out, world, batch, accum):
    """tests/dist/accumulation.py on ``world`` ranks (torchrun), or in this process for one."""
    script = os.path.join(HERE, "dist", "accumulation.py")
    if world == 1:
        import runpy
        runpy.run_path(script)["main"](str(out), batch, accum)
        return torch.load(out)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                           script, str(out), str(batch), str(accum)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.slow
def test_two_ranks_batch_b_accumulating_2_equal_one_process_batch_4b_with_clip_and_supcon(tmp_path):
    single = _accumulation_runs(tmp_path / "single.pth", 1, 8, 1)
    ranks = _accumulation_runs(tmp_path / "ranks.pth", 2, 2, 2)
    for loss_type in ("clip", "supcon"):
        for key in single[loss_type]:
            torch.testing.assert_close(ranks[loss_type][key], single[loss_type][key], rtol=1e-4, atol=1e-5)
    head = "projection_head.0.weight"  # the property is not trivial: per-batch negatives give other weights
    assert not torch.allclose(ranks["clip/per-batch"][head], single["clip"][head], rtol=1e-4, atol=1e-5)


def _batches(count, size, classes=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, classes, (size,), generator=g),
             F.normalize(torch.randn(size, dim, generator=g), dim=-1)) for _ in range(count)]


def _one_step(model, batches, alignment):
    from gpt4image.train.step import TrainStep, train_step
    criterion = lambda _, logits, y: F.cross_entropy(logits, y)  # noqa: E731
    step = TrainStep(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=criterion,
                     device=torch.device("cpu"), alignment=alignment, accum_iter=len(batches))
    for k, batch in enumerate(batches):
        train_step(step, batch, first=k == 0, update=k == len(batches) - 1)


def test_exact_accumulation_updates_batchnorm_statistics_once_per_batch_as_plain_accumulation():
    import copy
    from gpt4image.recipes import resnet as resnet_main
    args = resnet_main.get_args_parser().parse_args(["-a", "resnet18", "--input-size", "32"])
    torch.manual_seed(0)
    model = resnet_main.build_model(args, 4, 8)
    plain, exact = model, copy.deepcopy(model)
    batches = _batches(2, 4)
    _one_step(plain, batches, Alignment("clip", 0.2, exact_accumulation=False))
    _one_step(exact, batches, Alignment("clip", 0.2))
    buffers = dict(exact.named_buffers())
    assert buffers["backbone.bn1.num_batches_tracked"].item() == 2  # not 4: the no-grad pass left them alone
    for name, value in plain.named_buffers():
        torch.testing.assert_close(buffers[name], value, rtol=0, atol=1e-6, msg=name)


def test_the_recompute_draws_the_same_dropout_and_drop_path_masks_as_the_first_pass():
    from gpt4image.recipes import deit as deit_main
    args = deit_main.get_args_parser().parse_args(["--model", "deit_tiny_patch16_224", "--input-size", "32",
                                                   "--drop-path=0.5", "--drop=0.3"])
    torch.manual_seed(0)
    model = deit_main.build_model(args, 4, 8)
    outputs = []
    model.projection_head.register_forward_hook(lambda module, inputs, output: outputs.append(output.detach()))
    _one_step(model, _batches(2, 4), Alignment("supcon", 0.1))
    first_a, first_b, again_a, again_b = outputs  # first passes of batches a, b; then their recomputes
    assert torch.equal(first_a, again_a) and torch.equal(first_b, again_b)
    model(_batches(1, 4)[0][0])  # the masks are random: the same batch without the saved state differs
    assert not torch.allclose(outputs[-1], first_a)


@pytest.mark.parametrize("recipe, flags, expected", [
    ("deit", ["--loss_type=supcon", "--mix-text"], ["supcon", "--mix-text"]),
    ("resnet", ["--text-weight-schedule=cosin"], ["cosin", "not a schedule", "jump:A-B-R"]),
    ("deit", ["--text-weight-schedule=jump:30-10-0.1"], ["jump:30-10-0.1", "A <= B"]),
    ("resnet", ["--text-emb-standardize", "--text_emb=none"], ["--text-emb-standardize", "--text_emb none"]),
    ("deit", ["--loss_type=sigmoid", "--gather-with-grad", "--local-loss"], ["--local-loss", "clip"]),
])
def test_bad_combinations_are_one_line_exit_2_before_anything_is_written(recipe, flags, expected, tmp_path):
    from conftest import refused
    out = tmp_path / "out"
    where = ["--save_dir", str(out)] if recipe == "resnet" else ["--output_dir", str(out)]
    refused([os.path.join(REPO, recipe, "main.py"), *where, *flags], *expected)
    assert not out.exists()
