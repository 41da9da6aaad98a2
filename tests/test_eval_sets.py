"""--eval-set: every layout scored by its protocol, checked against predictions this file computes
from a classifier whose logits it knows; 2 ranks equal 1 process; bad sets refused before anything
is written; raw and EMA in log.txt, TensorBoard, the final line and the report."""
import json
import os
import re
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from conftest import DEIT, REPO, RESNET, ran, refused, run_script

ANCHORS = [20, 60, 100, 140, 180, 220]  # the fixed classifier predicts the class whose anchor is nearest the red
IMAGENET_INDEX = [0, 2, 7, 10, 500, 999]  # the training classes: these ImageNet-1k classes (sorted wnids)
SMALL = ["-a", "resnet18", "-b", "4", "--input-size", "16", "-j", "0"]


def wnid(index):
    from timm.data import ImageNetInfo
    return ImageNetInfo().label_names()[index]


def logits_by_hand(red):
    """The fixed classifier's logits, up to a positive scale and an offset common to all classes:
    -(u - a_k)^2 + u^2 with u an increasing affine function of the red value."""
    return [2 * a * red - a * a for a in ANCHORS]


def accuracy_by_hand(images, allowed=None, k=1):
    """Top-k (%) of (red, labels as model classes) among the ``allowed`` classes (all if None)."""
    candidates = list(allowed if allowed is not None else range(len(ANCHORS)))
    hits = 0
    for red, labels in images:
        logits = logits_by_hand(red)
        top = sorted(candidates, key=lambda c: -logits[c])[:k]
        hits += any(c in labels for c in top)
    return 100.0 * hits / len(images)


def save(path, red, fmt="PNG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (16, 16), (red, 90, 120)).save(path, format=fmt, quality=95)


# each set: its images as (folder, red, labels as model classes); model class k is ImageNet class IMAGENET_INDEX[k]
V2 = [("0", 25, {0}), ("0", 70, {0}), ("2", 55, {1}), ("10", 150, {3}), ("500", 195, {4}), ("999", 212, {5}),
      ("999", 105, {5})]
R = [(wnid(10), 165, {1}), (wnid(7), 110, {0}), (wnid(999), 185, {2}), (wnid(7), 150, {0}), (wnid(10), 135, {1})]
R_CLASSES = [2, 3, 5]  # model classes of R's folders; R's labels above are positions among them
SKETCH = [(wnid(i), red, {k}) for k, (i, red) in enumerate(zip(IMAGENET_INDEX, [25, 75, 95, 145, 230, 215]))]
# the validation folder: ILSVRC2012_val_<n> in class folders; ReaL's lists by ImageNet index, n = position + 1
VAL = [(0, 25), (1, 70), (2, 128), (3, 140), (4, 168), (5, 230), (1, 100)]
REAL = [[0], [2, 7], [], [7, 10], [999], [999], [500]]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """train/ and val/ of six ImageNet classes, and one folder per layout."""
    root = tmp_path_factory.mktemp("sets")
    for k, index in enumerate(IMAGENET_INDEX):
        for j in range(2):
            save(root / "data" / "train" / wnid(index) / f"t{j}.png", ANCHORS[k])
    for n, (k, red) in enumerate(VAL, 1):
        save(root / "data" / "val" / wnid(IMAGENET_INDEX[k]) / f"ILSVRC2012_val_{n:08d}.JPEG", red, "JPEG")
        save(root / "flat" / f"ILSVRC2012_val_{n:08d}.JPEG", red, "JPEG")
    json.dump(REAL, open(root / "real.json", "w"))
    json.dump(REAL, open(root / "flat" / "real.json", "w"))
    for name, images in (("v2", V2), ("r", R), ("sketch", SKETCH)):
        for j, (folder, red, _) in enumerate(images):
            save(root / name / folder / f"{j}.png", red)
    return root


def fixed_resnet18(path, classes=None):
    """A resnet18 whose logits are those of ``logits_by_hand`` (scaled and shifted) for a uniformly
    coloured image: conv1 passes each colour through its centre tap, BatchNorms are identities (plus
    10 in bn1, so ReLUs pass), residual branches are zero, downsampling keeps the channels, and fc
    maps the red feature u to 2 a_k u - a_k^2 with a_k the anchors in u's units."""
    import torchvision
    model = torchvision.models.resnet18(num_classes=len(ANCHORS))
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    for key in state:
        if key.endswith("running_var"):
            state[key].fill_(1.0)
        if key.endswith(".weight") and ("bn" in key or "downsample.1" in key):
            state[key].fill_(1.0 if "downsample" in key or key == "bn1.weight" else 0.0)
        if "downsample.0.weight" in key:
            n = state[key].shape[1]
            state[key][:n, :n, 0, 0] = torch.eye(n)
    for c in range(3):
        state["conv1.weight"][c, c, 3, 3] = 1.0
        state["bn1.bias"][c] = 10.0
    s = (1 + 1e-5) ** 0.5  # bn1 and three downsampling BatchNorms each divide by sqrt(1 + eps)
    anchors = torch.tensor([((a / 255 - 0.485) / 0.229 / s + 10.0) / s ** 3 for a in ANCHORS], dtype=torch.float64)
    state["fc.weight"][:, 0] = (2 * anchors).float()
    state["fc.bias"] = (-anchors ** 2).float()
    torch.save({"model": state, "classes": classes} if classes else state, path)
    return path


def eval_set_args(root):
    return [f"--eval-set=v2={root}/v2", f"--eval-set=r={root}/r", f"--eval-set=sketch={root}/sketch",
            f"--eval-set=real={root}/real.json", f"--eval-set=realflat={root}/flat"]


def expected():
    real = [(red, {IMAGENET_INDEX.index(i) for i in labels}) for (_, red), labels in zip(VAL, REAL) if labels]
    r = [(red, {R_CLASSES[k] for k in labels}) for _, red, labels in R]
    return {"v2": (accuracy_by_hand([(red, lab) for _, red, lab in V2]),
                   accuracy_by_hand([(red, lab) for _, red, lab in V2], k=5), len(V2)),
            "r": (accuracy_by_hand(r, R_CLASSES), None, len(R)),
            "sketch": (accuracy_by_hand([(red, lab) for _, red, lab in SKETCH]),
                       accuracy_by_hand([(red, lab) for _, red, lab in SKETCH], k=5), len(SKETCH)),
            "real": (accuracy_by_hand(real), None, len(real)), "realflat": (accuracy_by_hand(real), None, len(real))}


def reported(sets_dict, prefix=""):
    return {name: (sets_dict[f"{prefix}evalset_{name}_acc1"], sets_dict.get(f"{prefix}evalset_{name}_acc5"),
                   sets_dict[f"{prefix}evalset_{name}_num_images"]) for name in expected()}


def test_the_cases_that_tell_a_protocol_apart_are_in_the_data():
    # R: an image whose unmasked argmax is outside R's classes and whose restricted argmax is right
    red, labels = R[0][1], {R_CLASSES[k] for k in R[0][2]}
    logits = logits_by_hand(red)
    assert max(range(6), key=lambda c: logits[c]) not in R_CLASSES
    assert max(R_CLASSES, key=lambda c: logits[c]) in labels
    # ReaL: an image with two labels scored right by its second, and one with none
    assert [] in REAL and accuracy_by_hand([(VAL[3][1], {2, 3})]) == 100.0 and len(REAL[3]) == 2
    # V2: folder names sort as strings ("10" before "2"), so a mapping by ImageFolder's order would differ
    assert sorted({f for f, _, _ in V2}) != sorted({f for f, _, _ in V2}, key=int)
    e = expected()
    assert 0 < e["r"][0] < 100 and 0 < e["real"][0] < 100 and 0 < e["v2"][0] < 100


@pytest.mark.slow
def test_each_layout_scores_as_computed_by_hand_and_two_ranks_equal_one_process(sets, tmp_path):
    from gpt4image.recipes import resnet as resnet_main
    classes = [wnid(i) for i in IMAGENET_INDEX]
    checkpoint = fixed_resnet18(tmp_path / "fixed.pth", classes)
    stats = resnet_main.main([f"--data={sets}/data", "-e", f"--resume={checkpoint}", *SMALL, *eval_set_args(sets)])
    got = reported(stats["sets"])
    want = expected()
    for name in want:
        assert got[name][0] == pytest.approx(want[name][0]), name
        assert got[name][2] == want[name][2], name
        if want[name][1] is not None:
            assert got[name][1] == pytest.approx(want[name][1]), name
    assert got["r"][1] is None and got["real"][1] is None  # top-5 is not defined for 3 classes nor for ReaL

    proc = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", RESNET,
                       f"--data={sets}/data", "-e", f"--resume={checkpoint}", *SMALL, *eval_set_args(sets)],
                      cwd=os.path.join(REPO, "resnet"))
    two = {m.group(1): (float(m.group(2)), m.group(3) and float(m.group(3)), int(m.group(4)))
           for m in re.finditer(r"eval set (\w+): top-1 ([\d.]+)%(?: top-5 ([\d.]+)%)? over (\d+) images",
                                proc.stdout + proc.stderr)}
    assert {k: (round(a, 3), b if b is None else round(b, 3), n) for k, (a, b, n) in got.items()} == two


def test_a_plain_state_dict_is_mapped_by_the_training_folders_classes(sets, tmp_path):
    from gpt4image.recipes import resnet as resnet_main
    checkpoint = fixed_resnet18(tmp_path / "plain.pth")  # a torchvision state dict: no class list in it
    stats = resnet_main.main([f"--data={sets}/data", "-e", f"--resume={checkpoint}", *SMALL,
                              f"--eval-set=v2={sets}/v2"])
    assert stats["sets"]["evalset_v2_acc1"] == pytest.approx(expected()["v2"][0])


def test_two_hundred_of_a_thousand_classes_is_the_imagenet_r_protocol(tmp_path):
    from timm.data import ImageNetInfo
    from torchvision import transforms

    from gpt4image.train.eval_sets import build_eval_sets
    classes = ImageNetInfo().label_names()
    subset = classes[::5]
    for j, name in enumerate(subset):
        save(tmp_path / "r" / name / "a.png", j % 200)

    class NextToTheRedsClass(torch.nn.Module):
        """Image j of R (red j, class subset[j] = classes[5 j]): logit c = -|c - 5 j - 1|, so the plain
        argmax is 5 j + 1, a class outside R, and the nearest of R's classes is the right one."""
        def forward(self, x):
            red = x[:, 0].float().mean((1, 2))
            return -(torch.arange(1000.0)[None] - 5 * red[:, None] - 1).abs()
    val = SimpleNamespace(transform=transforms.PILToTensor())
    found = build_eval_sets(SimpleNamespace(eval_set=[f"r={tmp_path}/r"]), classes, val,
                            SimpleNamespace(rank=0, world_size=1), 64, 0, False)
    assert "ImageNet-R/-A protocol" in found.sets[0].kind
    images = torch.stack([found.sets[0].dataset[j][0] for j in range(200)])
    assert not set(NextToTheRedsClass()(images).argmax(1).tolist()) & set(range(0, 1000, 5))  # all wrong unmasked
    result = found.evaluate(NextToTheRedsClass(), torch.device("cpu"))
    assert result["evalset_r_acc1"] == 100.0 and result["evalset_r_num_images"] == 200


@pytest.mark.parametrize("recipe", [RESNET, DEIT])
def test_bad_sets_are_refused_in_one_line_before_anything_is_written(recipe, sets, tmp_path):
    run = tmp_path / "run"
    if recipe == RESNET:
        base = [RESNET, f"--data={sets}/data", f"--save_dir={run}", "--text_emb=none", *SMALL]
    else:
        base = [DEIT, f"--data-path={sets}/data", f"--output_dir={run}", "--text_emb=none",
                "--model=deit_tiny_patch16_224", "--input-size=16", "--batch-size=4", "--num_workers=0"]
    other = tmp_path / "other"
    for name in ("n99999999", "n88888888", wnid(0)):
        save(other / name / "a.png", 10)
    refused([*base, f"--eval-set=o={other}"], "2 of its 3 class folders are not among", "n88888888, n99999999")
    json.dump(REAL[:-1], open(tmp_path / "short.json", "w"))
    refused([*base, f"--eval-set=real={tmp_path}/short.json"], "6 label lists", "7 validation images")
    refused([*base, f"--eval-set=a={sets}/v2", f"--eval-set=a={sets}/r"], "'a' is given more than once")
    refused([*base, f"--eval-set=v2={tmp_path}/missing"], "does not exist", "must be a folder")
    refused([*base, f"--eval-set=v2={sets}/data/train/{wnid(0)}/t0.png"], "is a file")
    refused([*base, f"--eval-set={sets}/v2"], "NAME=PATH")
    refused([*base, "--eval-sets-every-epoch"], "needs at least one --eval-set")
    assert not run.exists()


def test_deit_logs_raw_and_ema_per_set_to_log_tensorboard_final_line_and_report(sets, tmp_path):
    import contextlib
    import io

    from gpt4image import report
    run = tmp_path / "run"
    common = [DEIT, f"--data-path={sets}/data", "--model=deit_tiny_patch16_224", "--input-size=16", "--batch-size=4",
              "--num_workers=0", "--text_emb=none", "--seed=0", f"--eval-set=r={sets}/r",
              f"--eval-set=real={sets}/real.json"]
    proc = ran([*common, f"--output_dir={run}", "--epochs=2"])
    rows = [json.loads(line) for line in open(run / "log.txt")]
    keys = {"evalset_r_acc1", "ema_evalset_r_acc1", "evalset_real_acc1", "ema_evalset_real_acc1"}
    assert not keys & set(rows[0]) and keys <= set(rows[1])  # after the last epoch only
    last = proc.stdout.strip().splitlines()[-1]
    assert f"r top-1 {rows[1]['evalset_r_acc1']:.2f}% (EMA {rows[1]['ema_evalset_r_acc1']:.2f}%)" in last, last
    assert "real top-1" in last

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert keys <= set(events.Tags()["scalars"])

    # evaluating the checkpoint gives the logged figures, raw and EMA
    evaluated = ran([*common, "--eval", f"--resume={run}/checkpoint.pth"])
    for key in keys:
        name = key.split("evalset_")[1][:-len("_acc1")]
        weights = " (EMA weights)" if key.startswith("ema_") else ""
        assert f"eval set {name}{weights}: top-1 {rows[1][key]:.3f}%" in evaluated.stdout, key

    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        assert report.main([str(run), "--plot", str(tmp_path / "c.png")]) == 0
    assert f"r {rows[1]['evalset_r_acc1']:.1f} (EMA {rows[1]['ema_evalset_r_acc1']:.1f})" in table.getvalue()
    assert os.path.isfile(tmp_path / "c.png")


def test_every_epoch_with_the_flag_and_a_resumed_run_may_change_its_sets(sets, tmp_path):
    from gpt4image.recipes import resnet as resnet_main
    run = tmp_path / "run"
    common = [f"--data={sets}/data", "--text_emb=none", *SMALL, f"--save_dir={run}", "--epochs=2"]
    resnet_main.main([*common, "--stop-after=1", f"--eval-set=v2={sets}/v2", "--eval-sets-every-epoch"])
    assert torch.load(run / "checkpoint.pth")["classes"] == [wnid(i) for i in IMAGENET_INDEX]
    result = resnet_main.main([*common, f"--eval-set=sk={sets}/sketch"])  # continues: sets only evaluate
    rows = [json.loads(line) for line in open(run / "log.txt")]
    assert "evalset_v2_acc1" in rows[0] and "evalset_sk_acc1" not in rows[0]  # epoch 0 of 2, with the flag
    assert "evalset_sk_acc1" in rows[1] and "evalset_v2_acc1" not in rows[1]
    assert result["eval_sets"]["evalset_sk_acc1"] == rows[1]["evalset_sk_acc1"]
    again = ran([RESNET, *common])  # a finished run repeats its final line, eval sets included
    assert f"eval sets: sk top-1 {rows[1]['evalset_sk_acc1']:.2f}%" in again.stdout.strip().splitlines()[-1]
