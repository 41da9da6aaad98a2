"""Whole classes of mistaken training input (issue 26, training half), in both recipes: the text table
is part of what defines a run, YAML configs pass the flags' own checks, --accum-iter fits an epoch,
weights files are read by what they hold, short DeiT runs that never leave warm-up are named, --help
shows each default once, loader workers fit the cores; and the report of runs."""
import contextlib
import io
import json
import os
from pathlib import Path
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DEIT, REPO, RESNET, built_once, ran, refused

WORKERS = {RESNET: "-j", DEIT: "--num_workers"}
TINY = {RESNET: ["-a", "resnet18", "-b", "4", "--input-size", "32", "--seed", "0", "-p", "50"],
        DEIT: ["--model", "deit_tiny_patch16_224", "--input-size", "32", "--batch-size", "4", "--seed", "0", "-p", "50",
               "--no-model-ema"]}
SMALL = {recipe: [*tiny, WORKERS[recipe], "0"] for recipe, tiny in TINY.items()}
DATA = {RESNET: "--data", DEIT: "--data-path"}
OUT = {RESNET: "--save_dir", DEIT: "--output_dir"}
CLASSES = {RESNET: "--num-classes", DEIT: "--nb-classes"}
RECIPES = pytest.mark.parametrize("recipe", [RESNET, DEIT], ids=["resnet", "deit"])


def _cmd(recipe, image_folder, table, out, *extra):
    return [recipe, f"{DATA[recipe]}={image_folder}", f"--text_emb={table}", *SMALL[recipe], f"{OUT[recipe]}={out}",
            *extra]


@pytest.fixture(scope="module")
def runs(image_folder, embeddings, tmp_path_factory):
    """{recipe: a folder holding epoch 0 of a 2-epoch run on the 4-class image folder}."""
    def build(folder):
        made = {}
        for recipe in (RESNET, DEIT):
            out = folder / os.path.basename(os.path.dirname(recipe)) / "run"
            ran(_cmd(recipe, image_folder, embeddings, out, "--epochs=2", "--stop-after=1"))
            made[recipe] = str(out)
        return made
    return {recipe: Path(out) for recipe, out in built_once(tmp_path_factory, "first_epochs_of_both", build).items()}


def _other_table(embeddings, path):
    """A table of the same shape as ``embeddings`` with other rows (another encoder, same width)."""
    table = torch.load(embeddings)
    torch.save(torch.nn.functional.normalize(torch.randn(table.shape, generator=torch.Generator().manual_seed(1)),
                                             dim=1).to(table.dtype), path)
    return str(path)


# 1. the text table defines the run -----------------------------------------------------------------

@RECIPES
def test_resuming_with_another_table_of_the_same_width_is_refused_and_an_older_checkpoint_still_resumes(
        recipe, runs, image_folder, embeddings, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(runs[recipe], run)
    other = _other_table(embeddings, tmp_path / "other.pth")
    refused(_cmd(recipe, image_folder, other, run, "--epochs=2"), "text_emb_fingerprint", "another output folder")
    # a checkpoint written before fingerprints were recorded resumes, saying so once
    checkpoint = torch.load(run / "checkpoint.pth", weights_only=True)
    del checkpoint["args"]["text_emb_fingerprint"]
    torch.save(checkpoint, run / "checkpoint.pth")
    out = ran(_cmd(recipe, image_folder, embeddings, run, "--epochs=2")).stdout
    assert out.count("before runs recorded their --text_emb table's fingerprint") == 1, out[-3000:]
    assert [json.loads(line)["epoch"] for line in (run / "log.txt").read_text().splitlines()] == [0, 1]


def test_the_fingerprint_reads_two_mib_of_a_large_table_and_tells_tables_apart(tmp_path, monkeypatch):
    from gpt4image.train.run_checks import table_fingerprint
    from gpt4image.text.tables import load_text_embeddings
    a = torch.nn.functional.normalize(torch.randn(3000, 256), dim=1).half()  # 1.5 MB, two reads overlap
    torch.save(a, tmp_path / "a.pth")
    __import__("shutil").copy(tmp_path / "a.pth", tmp_path / "copy.pth")  # the same bytes under another name
    b = a.clone()
    b[-1] = -b[-1]
    torch.save(b, tmp_path / "b.pth")
    fingerprint = {n: table_fingerprint(load_text_embeddings(str(tmp_path / f"{n}.pth"))) for n in ("a", "copy", "b")}
    assert fingerprint["a"] == fingerprint["copy"] != fingerprint["b"]
    big = tmp_path / "big.pth"
    torch.save(torch.zeros(4 << 20, dtype=torch.uint8), big)  # 4 MiB: only its two ends are read
    read = []
    real_open = open

    class Counting(io.FileIO):
        def read(self, n=-1):
            data = super().read(n)
            read.append(len(data))
            return data
    monkeypatch.setattr("builtins.open", lambda p, mode="r", *a, **k: Counting(p, "r") if p == str(big) and
                        mode == "rb" else real_open(p, mode, *a, **k))
    from gpt4image.text.tables import TextEmbeddings
    table_fingerprint(TextEmbeddings(torch.zeros(1, 1), str(big)))
    assert sum(read) == 2 << 20


# 2. YAML configs -----------------------------------------------------------------------------------

CONFIG_CASES = [('{switch}: "false"', "is not a boolean"), ("{switch}: 1", "is not a boolean"),
                ("text_emb:", "is empty (YAML null)"), ("lr: [1, 2]", "a list"), ("lr: '-1'", "lr"),
                ("epochs: 2.5", "epochs"), ("lamb: {{a: 1}}", "lamb"), ("colour: 1", "not a flag"),
                ("generated_size: [1, 2, 3]", "needs 2 values"), ("proj_type: cube", "invalid choice"),
                ("lr: .nan", "lr"), ("- lr\n- 1", "must map flag names")]


@RECIPES
@pytest.mark.parametrize("text,expected", CONFIG_CASES, ids=[c for c, _ in CONFIG_CASES])
def test_a_config_value_passes_the_checks_of_its_flag(recipe, text, expected):
    # refused while the arguments are parsed, so before anything is written
    switch = "no_scale_lr" if recipe == RESNET else "unscale_lr"
    line = _refused_config(_parser(recipe), text.format(switch=switch) + "\n")
    assert ".yaml" in line and expected in line, line


def _parser(recipe):
    import importlib
    module = "gpt4image.recipes.resnet" if recipe == RESNET else "gpt4image.recipes.deit"
    return importlib.import_module(module).get_args_parser()


def _refused_config(parser, text):
    """The one line with which parsing ``-c`` of a file holding ``text`` exits 2."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        args = _parse(parser, text)
        print(f"accepted: {vars(args)}")  # shown by the failure below
    line = err.getvalue().strip()
    assert e.value.code == 2 and len(line.splitlines()) == 1 and line.startswith("error: "), line
    return line


@RECIPES
def test_config_switches_take_yaml_booleans_and_null_keeps_a_none_default(recipe):
    parser = _parser(recipe)
    switch = "no_scale_lr" if recipe == RESNET else "unscale_lr"
    args = _parse(parser, f"{switch}: true\nlr: 1e-3\namp_dtype:\n")
    assert (getattr(args, switch), args.lr, args.amp_dtype) == (True, 1e-3, None)
    assert getattr(_parse(parser, f"{switch}: false\n"), switch) is False


@RECIPES
def test_a_repeatable_flag_takes_one_value_or_a_list_from_a_config(recipe):
    # as on the command line: a list of the values, whether the file gives one or several
    command_line = _parser(recipe).parse_args(["--eval-set=v2=a", "--eval-set=r=b"]).eval_set
    assert _parse(_parser(recipe), "eval_set: v2=a\n").eval_set == command_line[:1]
    assert _parse(_parser(recipe), "eval_set: [v2=a, r=b]\n").eval_set == command_line


def _parse(parser, text, path=None):
    import tempfile
    with tempfile.NamedTemporaryFile("wb", suffix=".yaml", delete=False) as f:
        f.write(text if isinstance(text, bytes) else text.encode("utf-8"))
    try:
        return parser.parse_args(["-c", f.name])
    finally:
        os.unlink(f.name)


YAML_TEXT = st.one_of(
    st.text(max_size=80),
    st.binary(max_size=80),
    st.dictionaries(st.sampled_from(["lr", "epochs", "text_emb", "no_scale_lr", "unscale_lr", "model_ema", "arch",
                                     "generated_size", "opt_betas", "clip_grad", "help", "config", "x"]),
                    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                             max_size=2),
                                 max_leaves=5),
                    max_size=4).map(lambda d: __import__("yaml").safe_dump(d)))


@RECIPES
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=YAML_TEXT)
def test_any_config_file_gives_arguments_or_one_line(recipe, text):
    parser = _parser(recipe)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            _parse(parser, text)
        except SystemExit as e:
            assert e.code == 2
            line = err.getvalue().strip()
            assert len(line.splitlines()) == 1 and line.startswith("error: "), line


# 3. --accum-iter ----------------------------------------------------------------------------------

@RECIPES
def test_accumulating_more_batches_than_an_epoch_has_is_refused_with_both_numbers(recipe, image_folder, embeddings,
                                                                                 tmp_path):
    # 48 training images, batches of 4: 12 per epoch
    refused(_cmd(recipe, image_folder, embeddings, tmp_path / "out", "--epochs=1", "--accum-iter=13"),
            "--accum-iter 13", "12 batch(es) of 4")
    assert not (tmp_path / "out").exists()


# 4. weights files read by what they hold ----------------------------------------------------------

@RECIPES
def test_a_table_given_as_pretrained_weights_is_named(recipe, image_folder, embeddings, tmp_path):
    refused(_cmd(recipe, image_folder, embeddings, tmp_path / "out", f"--pretrained={embeddings}"),
            "--pretrained", "tensor", "text-embedding table")


@RECIPES
def test_resuming_a_checkpoint_of_another_class_count_names_both_counts(recipe, runs, embeddings, tmp_path):
    cmd = [recipe, f"--text_emb={embeddings}", *SMALL[recipe], f"{OUT[recipe]}={tmp_path / 'out'}", "--epochs=2",
           "--generated-size", "48", "16", f"{CLASSES[recipe]}=5",
           f"--resume={runs[recipe]}"]  # a run folder: its checkpoint.pth
    refused(cmd, "classifies 4 classes", "this run has 5")


@RECIPES
def test_a_run_folder_stands_for_its_checkpoint_and_a_folder_without_one_is_named(recipe, runs, image_folder,
                                                                                   tmp_path):
    flag = "-e" if recipe == RESNET else "--eval"
    out = ran([recipe, DATA[recipe] + "=" + image_folder, *SMALL[recipe], flag, f"--resume={runs[recipe]}"]).stdout
    assert "using its checkpoint.pth" in out and "top-1" in out
    refused([recipe, DATA[recipe] + "=" + image_folder, *SMALL[recipe], flag, f"--resume={tmp_path}"],
            "folder without a checkpoint.pth")


@RECIPES
def test_ddp_saved_weights_load_for_pretrained_and_evaluation(recipe, runs, image_folder, embeddings, tmp_path):
    state = torch.load(runs[recipe] / "checkpoint.pth", weights_only=True)["model"]
    ddp = tmp_path / "ddp.pth"
    torch.save({"module." + k: v for k, v in state.items()}, ddp)
    flag = "-e" if recipe == RESNET else "--eval"
    out = ran([recipe, DATA[recipe] + "=" + image_folder, *SMALL[recipe], flag, f"--resume={ddp}"]).stdout
    assert "evaluation of" in out
    out = ran(_cmd(recipe, image_folder, embeddings, tmp_path / "out", "--epochs=1", f"--pretrained={ddp}",
                   "--stop-after=1", "--accum-iter=1")).stdout
    assert "initialised from" in out


@RECIPES
def test_weights_of_another_architecture_are_one_line_naming_both(recipe, image_folder, embeddings, tmp_path):
    if recipe == RESNET:
        import torchvision
        torch.save(torchvision.models.resnet50(num_classes=4).state_dict(), tmp_path / "w.pth")
        names = ("resnet50", "resnet18")
    else:
        import timm
        small = timm.create_model("deit_small_patch16_224", num_classes=4, img_size=32)
        torch.save({"arch": "deit_small_patch16_224", "model": small.state_dict()}, tmp_path / "w.pth")
        names = ("deit_small_patch16_224", "deit_tiny_patch16_224")
    err = io.StringIO()
    with contextlib.redirect_stdout(err):
        line = refused(_cmd(recipe, image_folder, embeddings, tmp_path / "out", f"--pretrained={tmp_path / 'w.pth'}"),
                       *names)
    assert "dropping" not in err.getvalue(), line


@RECIPES
def test_val_text_emb_errors_name_the_validation_set_and_its_flag(recipe, image_folder, embeddings, tmp_path):
    line = refused(_cmd(recipe, image_folder, embeddings, tmp_path / "out", f"--val-text-emb={embeddings}"),
                   "--val-text-emb", "val set has 16")
    assert "training" not in line and "train set" not in line
    line = refused(_cmd(recipe, image_folder, embeddings, tmp_path / "out", f"--val-text-emb={tmp_path / 'no.pth'}"),
                   "--val-text-emb")
    assert "--text_emb none" not in line


# 5 and 6. the start of a run: lr as trained, warm-up, workers -----------------------------------

@RECIPES
@pytest.mark.parametrize("scaled", [True, False], ids=["scaled", "unscaled"])
def test_the_start_line_says_scaled_only_when_scaling_and_workers_fit_the_cores(recipe, scaled, image_folder, tmp_path,
                                                                                recwarn):
    cores = len(os.sched_getaffinity(0))
    flag = {RESNET: "--no_scale_lr", DEIT: "--unscale-lr"}[recipe]
    many = cores + 3
    cmd = [recipe, f"{DATA[recipe]}={image_folder}", "--text_emb=none", *TINY[recipe], WORKERS[recipe], str(many),
           f"{OUT[recipe]}={tmp_path / 'out'}", "--epochs=1", *([] if scaled else [flag])]
    out = ran(cmd).stdout
    start = next(line for line in out.splitlines() if "process(es):" in line)
    assert ("scaled to it" in start) == scaled and (flag in start) != scaled, start
    assert out.count(f"{many}: this process may use {cores} core") == 1
    assert not [w for w in recwarn if "worker" in str(w.message)]


@pytest.mark.parametrize("flags,warned", [(["--epochs=2"], True), (["--epochs=2", "--warmup-epochs=0"], False),
                                          (["--epochs=7"], False), (["--epochs=6"], True)])
def test_a_deit_run_entirely_in_warm_up_is_warned_once_with_its_lr(flags, warned, image_folder, tmp_path):
    out = ran([DEIT, f"--data-path={image_folder}", "--text_emb=none", *SMALL[DEIT], *flags,
               f"--output_dir={tmp_path / 'out'}", "--stop-after=1"]).stdout
    assert out.count("every epoch of this run is in the warm-up") == int(warned), out[-2000:]
    if warned:
        assert "lr 1e-06 to" in out and "--warmup-epochs" in out and "--sched-no-lag" in out


ENTRY_POINTS = ["resnet", "deit", "generate_descriptions", "description2embedding", "report"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_help_shows_each_default_once(entry):
    import importlib
    import sys
    if entry in ("resnet", "deit"):
        main = importlib.import_module(f"gpt4image.recipes.{entry}").main
    elif entry == "report":
        from gpt4image.report import main
    else:
        sys.path.insert(0, REPO)
        try:
            main = importlib.import_module(entry).main
        finally:
            sys.path.remove(REPO)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["--help"])
    text = out.getvalue()
    blocks = re.split(r"\n(?=  -)", text)
    for block in blocks:
        if "(default: " in block:
            assert block.lower().count("default") == 1, block
    assert "(default: None)" not in text and "(default: False)" not in text


# 7 and 8. the report ------------------------------------------------------------------------------

def _fake_run(folder, args, rows):
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps(args))
    (folder / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in rows))


ARGS = {"recipe": "resnet", "arch": "resnet18", "epochs": 2, "text_emb": "t.pth", "loss_type": "clip", "lamb": 0.3,
        "tau": 0.2, "batch_size": 32, "world_size": 2, "input_size": 32}
ROWS = [{"epoch": e, "test_acc1": 10.0 + e, "train_ce_loss": 2.0, "train_text_loss": 3.0} for e in range(2)]


def test_a_folder_of_runs_is_reported_run_by_run_and_another_tools_folder_is_skipped(tmp_path, capsys):
    from gpt4image import report
    older = {k: v for k, v in ARGS.items() if k != "recipe"}  # written before args.json named its recipe
    _fake_run(tmp_path / "all" / "a", ARGS, ROWS)
    _fake_run(tmp_path / "all" / "group" / "b", older, ROWS[:1])
    _fake_run(tmp_path / "all" / "other", {"lr": 0.1, "model": "bert", "epochs": 3}, [])
    assert report.main([str(tmp_path / "all")]) == 0
    out, err = capsys.readouterr()
    rows = [line for line in out.splitlines() if line.startswith("| all")]
    assert [r.split(" | ")[0] for r in rows] == ["| all/a", f"| all/{os.path.join('group', 'b')}"], out
    assert "other" not in out and "skipped" in err and "other" in err
    assert report.main([str(tmp_path / "all" / "other")]) == 2


def _drawn(run, tmp_path, monkeypatch):
    """The figure ``python -m gpt4image.report RUN --plot`` draws."""
    from matplotlib.figure import Figure
    from gpt4image import report
    drawn, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), save(self, *a, **k))[1])
    with contextlib.redirect_stdout(io.StringIO()):
        assert report.main([str(run), "--plot", str(tmp_path / "c.png")]) == 0
    return drawn[0]


def test_the_report_tells_runs_of_other_text_targets_and_labels_apart(tmp_path):
    from gpt4image.report import summarise
    paper = summarise(tmp_path, (ARGS, ROWS))["alignment"]
    assert "target" not in paper and "labels" not in paper
    noisy = summarise(tmp_path, (dict(ARGS, text_target="shuffled", label_noise=0.4, shots=10), ROWS))["alignment"]
    assert noisy.endswith("target=shuffled; labels: noise 0.4, 10 shots")
    baseline = summarise(tmp_path, (dict(ARGS, text_emb="none", train_fraction=0.5), ROWS))["alignment"]
    assert baseline == "off; labels: fraction 0.5"


def test_the_chance_level_counts_the_images_each_loss_compares():
    from gpt4image.report import chance_text_loss
    assert chance_text_loss(ARGS)[1] == 64  # clip: the global batch, 32 x 2 processes
    assert chance_text_loss(dict(ARGS, loss_type="ctr"))[1] == 32  # ctr: the local batch only
    exact = dict(ARGS, accum_iter=4, accum_alignment="exact")  # clip over the 4 batches of each step
    assert chance_text_loss(exact)[1] == 256
    assert chance_text_loss(dict(exact, accum_alignment="per-batch"))[1] == 64
    assert chance_text_loss(dict(exact, loss_type="ctr"))[1] == 32


def test_the_curves_have_whole_epochs_a_chance_line_and_no_empty_retrieval_panel(tmp_path, monkeypatch):
    _fake_run(tmp_path / "a", ARGS, ROWS)
    fig = _drawn(tmp_path / "a", tmp_path, monkeypatch)
    assert len(fig.axes) == 3  # no run measured retrieval
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    chance = [line for line in fig.axes[2].get_lines() if "chance" in line.get_label()]
    assert len(chance) == 1 and abs(chance[0].get_ydata()[0] - torch.log(torch.tensor(64.0)).item()) < 1e-6
    assert "log(64)" in chance[0].get_label() and "global batch" in chance[0].get_label()
    retrieval = [dict(r, test_i2t_r1=5.0, test_t2i_r1=6.0) for r in ROWS]
    _fake_run(tmp_path / "b", ARGS, retrieval)
    assert len(_drawn(tmp_path / "b", tmp_path, monkeypatch).axes) == 4


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(log=st.one_of(st.binary(max_size=300),
                     st.lists(st.dictionaries(st.sampled_from(["epoch", "test_acc1", "ema_test_acc1", "images_per_s",
                                                               "test_i2t_r1", "test_t2i_r1", "train_text_loss"]),
                                              st.none() | st.booleans() | st.integers() | st.floats()
                                              | st.text(max_size=3) | st.lists(st.integers(), max_size=2)),
                              max_size=4).map(lambda rows: "\n".join(json.dumps(r) for r in rows).encode()),
                     st.just(b"[" * 5000 + b"\n")))
def test_any_log_gives_rows_or_named_skips(log, tmp_path_factory):
    from gpt4image import report
    run = tmp_path_factory.mktemp("run")
    (run / "args.json").write_text(json.dumps(ARGS))
    (run / "log.txt").write_bytes(log)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert report.main([str(run)]) == 0
    assert all(line.startswith("warning: ") and "skipped" in line for line in err.getvalue().splitlines())
    runs = report.collect([str(run)], warn=lambda _: None)
    import matplotlib.pyplot as plt
    plt.close(report.curves_figure(runs))
