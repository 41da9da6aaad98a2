"""Text targets and their controls, noisy and scarce labels, and the experiment that compares them."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import D2E, REPO, RESNET, ran, refused, run_script, snapshot
from gpt4image.errors import UserError
from gpt4image.train.losses import alignment_loss
from gpt4image.train.alignment_state import AlignmentState
from gpt4image.text.tables import TextEmbeddings
from gpt4image.train.class_descriptions import per_class_rows
from gpt4image.train.label_subsets import balanced_subset, symmetric_label_noise
from gpt4image.train.target_rows import ClassRows, IndexedRows, RandomRows, class_mean_table, row_blocks, shuffled_index

SMALL = ["-a", "resnet18", "-b", "8", "--input-size", "32", "-j", "0", "-p", "100", "--seed", "3"]


class Rows:
    """A table as the row sources see one (``dim`` and indexing)."""

    def __init__(self, table):
        self.table, self.dim = table, table.shape[1]

    def __len__(self):
        return len(self.table)

    def __getitem__(self, k):
        return self.table[k]


def test_class_mean_rows_are_the_renormalised_mean_of_each_class():
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 2])
    means = class_mean_table(Rows(table), labels, 4)
    half = 1 / math.sqrt(2)  # class 0: mean (0.5, 0.5), renormalised
    assert torch.allclose(means, torch.tensor([[half, half], [0.6, 0.8], [1.0, 0.0], [0.0, 0.0]]))


def test_shuffled_keeps_each_class_multiset_and_moves_every_row_of_a_class_with_two_or_more():
    labels = torch.tensor([0, 1, 0, 0, 2, 1, 0, 1, 1, 1])
    index = shuffled_index(labels, seed=5)
    for c in range(3):
        members = (labels == c).nonzero().flatten()
        assert sorted(index[members].tolist()) == members.tolist()  # the same rows, all of class c
    assert index[4] == 4  # alone in its class
    moved = [k for k in range(10) if k != 4]
    assert all(index[k] != k for k in moved)
    assert torch.equal(index, shuffled_index(labels, seed=5))  # fixed by the seed
    assert not torch.equal(index, shuffled_index(labels, seed=6))


def test_random_rows_are_unit_fixed_by_seed_and_image_and_independent_of_anything_else():
    a, b = RandomRows(torch.tensor([3, 7, 9]), 16, seed=1), RandomRows(torch.tensor([9, 3]), 16, seed=1)
    assert torch.allclose(a[0].norm(), torch.tensor(1.0))
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])  # image 3's and 9's rows, whatever the subset
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], RandomRows(torch.tensor([3]), 16, seed=2)[0])


def test_label_noise_flips_exactly_floor_p_n_labels_to_another_class_the_same_way_for_a_seed():
    labels = torch.arange(23) % 5
    for p, flips in ((0.0, 0), (0.3, 6), (0.4, 9), (0.6, 13), (0.99, 22)):  # floor(p * 23)
        noisy = symmetric_label_noise(labels, 5, p, seed=1)
        assert int((noisy != labels).sum()) == flips
        assert noisy.min() >= 0 and noisy.max() < 5
        assert torch.equal(noisy, symmetric_label_noise(labels, 5, p, seed=1))
    two = symmetric_label_noise(torch.tensor([0, 1] * 5), 2, 0.5, seed=0)
    assert int((two != torch.tensor([0, 1] * 5)).sum()) == 5  # with 2 classes a flip is the other class
    assert not torch.equal(symmetric_label_noise(labels, 5, 0.4, 1), symmetric_label_noise(labels, 5, 0.4, 2))


def test_shots_and_fractions_are_class_balanced_and_deterministic():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    shots = balanced_subset(labels, 3, shots=2, seed=0)
    assert torch.bincount(labels[shots]).tolist() == [2, 2, 2]
    assert torch.equal(shots, shots.sort().values) and torch.equal(shots, balanced_subset(labels, 3, shots=2, seed=0))
    half = balanced_subset(labels, 3, fraction=0.5, seed=0)
    assert torch.bincount(labels[half]).tolist() == [2, 1, 2]  # floor(2.5), floor(1.5), floor(2)
    tiny = balanced_subset(labels, 3, fraction=0.01, seed=0)
    assert torch.bincount(labels[tiny]).tolist() == [1, 1, 1]  # at least one of every class
    assert torch.equal(balanced_subset(labels, 3, seed=0), torch.arange(12))
    draws = {tuple(balanced_subset(labels, 3, shots=2, seed=s).tolist()) for s in range(6)}
    assert len(draws) > 1  # the seed chooses which images
    with pytest.raises(UserError, match="--shots 4 is more than the 3 training images of class 1"):
        balanced_subset(labels, 3, shots=4)


def test_per_class_rows_are_the_renormalised_mean_of_the_descriptions():
    encoded = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    rows = per_class_rows(encoded, torch.tensor([0, 0, 1]), 2)
    assert torch.allclose(rows, torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2)], [0.0, 1.0]]))


E = math.e
# Three images, t0 = t1 = e1, t2 = e2; z0 = e1, z1 = e2, z2 = e1; tau 1. Image-to-text logits: z0 [1, 1, 0],
# z1 [0, 0, 1], z2 [1, 1, 0]; text-to-image: t0 and t1 [1, 0, 1], t2 [0, 1, 0].
# -log mass on {t0, t1}
SHARED_I2T = (math.log((2 * E + 1) / (2 * E)) + math.log((2 + E) / 2) + math.log(2 * E + 1)) / 3
SHARED_T2I = (2 * math.log((2 * E + 1) / (E + 1)) + math.log(2 + E)) / 3  # t0, t1: -log mass on {z0, z1}
PAPER_I2T = (math.log((2 * E + 1) / E) + math.log(2 + E) + math.log(2 * E + 1)) / 3  # only the diagonal
PAPER_T2I = (math.log((2 * E + 1) / E) + math.log(2 * E + 1) + math.log(2 + E)) / 3


@pytest.mark.parametrize("shared", [True, False])
def test_contrastive_loss_treats_identical_targets_as_positives_only_when_targets_are_shared(shared):
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    i2t, t2i = (SHARED_I2T, SHARED_T2I) if shared else (PAPER_I2T, PAPER_T2I)
    loss = alignment_loss(z, t, "clip", tau=1.0, shared_targets=shared)
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    assert alignment_loss(z, t, "ctr", tau=1.0, shared_targets=shared).item() == pytest.approx(i2t, rel=1e-6)
    # with distinct rows the shared treatment is the paper's loss exactly
    distinct = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    feats = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(alignment_loss(feats, distinct, shared_targets=shared), alignment_loss(feats, distinct))


@pytest.mark.parametrize("shared", [True, False])
def test_sigmoid_loss_makes_identical_targets_positive_pairs_only_when_targets_are_shared(shared):
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    logits = [[1, 1, 0], [0, 0, 1], [1, 1, 0]]  # <z_i, t_j> at scale e^0 = 1, bias 0
    signs = [[1, 1, -1], [1, 1, -1], [-1, -1, 1]] if shared else [[1, -1, -1], [-1, 1, -1], [-1, -1, 1]]
    expected = sum(math.log(1 + math.exp(-signs[i][j] * logits[i][j])) for i in range(3) for j in range(3)) / 3
    loss = alignment_loss(z, t, "sigmoid", log_scale=torch.tensor(0.0), bias=torch.tensor(0.0), shared_targets=shared)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------ the recipes

def _labels(run):
    return json.load(open(os.path.join(run, "train_labels.json")))


def _losses(run):
    return [json.loads(line)["train_loss"] for line in open(os.path.join(run, "log.txt"))]


def _statistics(rows):
    state = AlignmentState("clip", 3, standardize=True)
    state.set_statistics_of_blocks(row_blocks(rows, chunk=2))
    return state.text_mean.double(), state.text_std.double()


def test_standardisation_statistics_are_those_of_the_rows_trained_towards():
    g = torch.Generator().manual_seed(0)
    table = TextEmbeddings(torch.randn(7, 3, generator=g), "t.pth")
    kept = torch.tensor([0, 2, 3, 6])  # --shots / --train-fraction: the kept images' rows only
    mean, std = _statistics(IndexedRows(table, kept))
    torch.testing.assert_close(mean, table.table[kept].double().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, table.table[kept].double().std(0), rtol=1e-5, atol=1e-6)
    labels = torch.tensor([1, 0, 1, 1])  # class-level targets: each image's class row
    mean, std = _statistics(ClassRows(table.table[:2], labels, "t.pth"))
    torch.testing.assert_close(mean, table.table[labels].double().mean(0), rtol=1e-5, atol=1e-6)
    from gpt4image.train.text_per_step import MultiTextEmbeddings
    many = torch.randn(5, 2, 3, generator=g)
    sampled = MultiTextEmbeddings(many, "m.pth", {}, "sample", 0)  # all N x K descriptions it may draw
    torch.testing.assert_close(_statistics(sampled)[0], many.reshape(10, 3).double().mean(0), rtol=1e-5, atol=1e-6)
    averaged = MultiTextEmbeddings(many, "m.pth", {}, "mean", 0)  # the rows it serves
    served = torch.stack([averaged[k] for k in range(5)]).double()
    torch.testing.assert_close(_statistics(averaged)[0], served.mean(0), rtol=1e-5, atol=1e-6)


def test_a_table_of_several_descriptions_per_image_is_refused_with_the_fix_for_these_flags(tmp_path):
    from gpt4image.train.text_targets import TrainingTargets, attach_training_targets
    torch.save(F.normalize(torch.randn(4, 2, 8), dim=-1), tmp_path / "k.pth")
    with pytest.raises(UserError, match=r"2 descriptions per image .*cannot use yet; average them"):
        attach_training_targets(list(range(4)), str(tmp_path / "k.pth"), False, TrainingTargets(2, shots=1))


def test_standardised_run_trains_on_few_shots_with_class_targets(image_folder, embeddings, tmp_path):
    from gpt4image.recipes import resnet as resnet_main
    resnet_main.main([f"--data={image_folder}", f"--text_emb={embeddings}", *SMALL, "--shots=4", "--epochs=1",
                      "--text-target=class-mean", "--text-emb-standardize", f"--save_dir={tmp_path}"])
    assert math.isfinite(_losses(tmp_path)[0])


def test_noisy_random_run_resumed_equals_the_straight_run_and_records_its_labels(image_folder, embeddings, tmp_path):
    from gpt4image.recipes import resnet as resnet_main
    common = [f"--data={image_folder}", f"--text_emb={embeddings}", *SMALL, "--label-noise=0.5", "--shots=10",
              "--text-target=random"]
    resnet_main.main([*common, f"--save_dir={tmp_path}/straight", "--epochs=2"])
    resnet_main.main([*common, f"--save_dir={tmp_path}/resumed", "--epochs=2", "--stop-after=1"])
    resnet_main.main([*common, f"--save_dir={tmp_path}/resumed", "--epochs=2"])
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "resumed")  # same labels and random rows
    record = _labels(tmp_path / "straight")
    assert record == _labels(tmp_path / "resumed")
    assert len(record["indices"]) == 40 and sum(a != b for a, b in zip(record["labels"], record["original"])) == 20
    assert record["original"] == [k // 12 for k in record["indices"]]  # 12 images per class folder, in order
    args = json.load(open(tmp_path / "straight" / "args.json"))
    assert (args["text_target"], args["label_noise"], args["shots"]) == ("random", 0.5, 10)
    refused([RESNET, *common[:-1], "--text-target=shuffled", f"--save_dir={tmp_path}/resumed", "--epochs=2",
             f"--resume={tmp_path}/resumed/checkpoint.pth"], "--text-target 'random'")


def test_an_explicit_resume_with_another_seed_is_refused_only_when_the_seed_drew_the_labels():
    from argparse import Namespace
    from gpt4image.train.checkpoint import check_same_run
    saved = {"seed": 0, "text_target": "image", "label_noise": 0.4, "train_fraction": 1.0, "shots": None}
    with pytest.raises(UserError, match="--seed 0"):
        check_same_run({"args": saved}, "c.pth", Namespace(**dict(saved, seed=1)), explicit=True)
    paper = dict(saved, label_noise=0.0)  # the seed drew nothing: a warning, as before
    check_same_run({"args": paper}, "c.pth", Namespace(**dict(paper, seed=1)), explicit=True)


@pytest.mark.slow
def test_two_ranks_train_on_the_labels_of_one_process(image_folder, embeddings, tmp_path):
    common = [f"--data={image_folder}", f"--text_emb={embeddings}", "-a", "resnet18", "-b", "4", "--input-size", "16",
              "-j", "0", "--epochs=1", "--label-noise=0.4", "--train-fraction=0.75", "--text-target=class-mean"]
    ran([RESNET, *common, f"--save_dir={tmp_path}/one"], cwd=os.path.join(REPO, "resnet"))
    proc = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", RESNET, *common,
                       f"--save_dir={tmp_path}/two"], cwd=os.path.join(REPO, "resnet"))
    assert _labels(tmp_path / "one") == _labels(tmp_path / "two")
    assert "training labels: 36 of 48 images (fraction 0.75 of every class), 14 labels flipped" in proc.stdout
    assert "text_target=class-mean" in proc.stdout


def test_deit_trains_with_a_per_class_table_and_noisy_labels(image_folder, tiny_clip, tmp_path):
    from gpt4image.recipes import deit as deit_main
    classes = sorted(os.listdir(os.path.join(image_folder, "train")))
    mapping = {name: [f"a photo of a {name.replace('_', ' ')}.", f"a {name}"] for name in classes}
    (tmp_path / "classes.json").write_text(json.dumps(mapping))
    import description2embedding
    table = str(tmp_path / "classes_emb.pth")
    description2embedding.main([f"--caption={tmp_path}/classes.json", "--per-class", f"--data={image_folder}/train",
                                f"--model={tiny_clip}", f"--output={table}", "--workers=0", "--quiet",
                                "--dtype=float32"])
    # each row is the renormalised mean of its class's descriptions, encoded one by one
    from gpt4image.text.encoder import load_text_encoder
    from gpt4image.text.encoding import encode_texts
    encoder = load_text_encoder(tiny_clip, "cpu", None, allow_download=False, allow_hub_download=False)
    texts = [t for name in classes for t in mapping[name]]
    encoded, _, _ = encode_texts(encoder, texts, batch_size=8, num_workers=0, out_dtype=torch.float32,
                                 chunks=False, progress=False, pin_memory=False)
    expected = F.normalize(encoded.view(len(classes), 2, -1).mean(1), dim=1)
    assert torch.allclose(torch.load(table), expected, atol=1e-6)
    assert json.load(open(table + ".json"))["classes"] == classes
    out = deit_main.main([f"--data-path={image_folder}", f"--text_emb={table}", "--text-target=class-text",
                          "--label-noise=0.25", "--model=deit_tiny_patch16_224", "--input-size=32", "--batch-size=8",
                          "--num_workers=0", "--epochs=1", "--aa=none", "--mixup=0", "--cutmix=0", "--reprob=0",
                          f"--output_dir={tmp_path}/deit", "-p", "100"])
    assert out["final_acc1"] is not None
    record = _labels(tmp_path / "deit")
    assert sum(a != b for a, b in zip(record["labels"], record["original"])) == 12  # floor(0.25 x 48)
    # a class missing from the per-class file
    (tmp_path / "three.json").write_text(json.dumps({name: "a shape" for name in classes[:3]}))
    before = snapshot(tmp_path)
    refused([D2E, f"--caption={tmp_path}/three.json", "--per-class", f"--data={image_folder}/train",
             f"--model={tiny_clip}", f"--output={tmp_path}/three_emb.pth", "--workers=0"], classes[3], "no description")
    assert snapshot(tmp_path) == before
    with pytest.raises(UserError, match="--drop-flagged"):  # a per-class file carries no quality flags
        description2embedding.main([f"--caption={tmp_path}/classes.json", "--per-class", "--drop-flagged",
                                    f"--data={image_folder}/train", f"--output={tmp_path}/x.pth"])
    assert snapshot(tmp_path) == before


BAD = [(["--label-noise=1"], "--label-noise"), (["--label-noise=-0.1"], "--label-noise"),
       (["--train-fraction=0"], "--train-fraction"), (["--train-fraction=1.5"], "--train-fraction"),
       (["--shots=0"], "--shots"), (["--shots=13"], "--shots 13 is more than the 12"),
       (["--shots=2", "--train-fraction=0.5"], "pass one of them"),
       (["--text-target=random", "--text_emb=none"], "--text-target random needs a text table"),
       (["--text-target=class-text"], "has 48 rows but the training set has 4 classes")]


@pytest.mark.parametrize("flags,text", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_targets_and_labels_are_one_line_exit_2_and_nothing_is_written(flags, text, image_folder, embeddings,
                                                                          tmp_path):
    refused([RESNET, f"--data={image_folder}", f"--text_emb={embeddings}", *SMALL, f"--save_dir={tmp_path}/run",
             *flags], text)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_the_quick_experiment_prints_a_table_of_every_condition_and_draws_the_plot(tmp_path):
    proc = run_script(["-m", "gpt4image.experiment", "--quick", f"--out={tmp_path}", "--jobs=1"], timeout=600)
    table = proc.stdout.split("mean ± std")[1]
    for condition in ("baseline", "image", "class-text", "shuffled", "random"):
        assert condition in table
    assert table.count("| resnet | 0.6 |") == 1 and table.count("| deit | 0.6 |") == 1
    assert os.path.getsize(tmp_path / "plot.png") > 0
    results = json.load(open(tmp_path / "results.json"))["runs"]
    assert len(results) == 10 and all(0 <= r["acc1"] <= 100 for r in results)
    assert f"outputs in {tmp_path}" in proc.stdout.splitlines()[-1]
    # the same command again continues: nothing left to train, the same table
    again = ran(["-m", "gpt4image.experiment", "--quick", f"--out={tmp_path}", "--jobs=1"])  # in this process
    assert "10 of 10 runs already measured, 0 to train" in again.stdout
    assert again.stdout.split("mean ± std")[1].split("experiment finished")[0] == table.split("experiment finished")[0]
    # other settings into the same folder: refused, the results untouched
    before = (tmp_path / "results.json").read_bytes()
    refused(["-m", "gpt4image.experiment", "--quick", "--lamb=0.5", f"--out={tmp_path}"], "--lamb: None there, 0.5 now")
    assert (tmp_path / "results.json").read_bytes() == before
