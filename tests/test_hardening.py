"""Bad input and faults answered with one line and exit code 2 before anything of the user's changes;
the run folder held by one run at a time; a rank that stops making progress ends the job."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import D2E, DEIT, ENV, REPO, RESNET, SMALL, copy_run, ran, refused, snapshot


@pytest.fixture
def previous_run(first_of_two_epochs, tmp_path):
    """An output folder holding one finished epoch of a 2-epoch resnet18 run (a copy of the session's)."""
    return copy_run(first_of_two_epochs, tmp_path / "run")


RESNET_BAD = [(["--lr", "-0.1"], "--lr"), (["-b", "0"], "--batch-size"), (["-j", "-1"], "--workers"),
              (["--epochs", "0"], "--epochs"), (["--tau", "0"], "--tau"), (["--lamb", "-1"], "--lamb"),
              (["--lr", "nan"], "--lr"), (["--momentum", "1.5"], "--momentum"), (["--wd", "-0.0001"], "--wd"),
              (["--stop-after", "0"], "--stop-after"), (["--checkpoint-every-minutes", "-1"], "--checkpoint-every"),
              (["--input-size", "0"], "--input-size"), (["-p", "0"], "--print-freq")]


@pytest.mark.parametrize("flags,name", RESNET_BAD, ids=[" ".join(f) for f, _ in RESNET_BAD])
def test_resnet_numbers_out_of_range_are_refused_at_parse_time_and_the_folder_is_untouched(flags, name, tmp_path):
    (tmp_path / "args.json").write_text('{"arch": "resnet18"}\n')
    before = snapshot(tmp_path)
    refused([RESNET, "--text_emb=none", *SMALL, f"--save_dir={tmp_path}", *flags], name, flags[1])
    assert snapshot(tmp_path) == before


DEIT_BAD = [(["--num_workers", "-1"], "--num_workers"), (["--batch-size", "0"], "--batch-size"),
            (["--drop-path", "1.0"], "--drop-path"), (["--smoothing", "-0.1"], "--smoothing"),
            (["--eval-crop-ratio", "0"], "--eval-crop-ratio"), (["--mixup-prob", "2"], "--mixup-prob"),
            (["--lr", "-1"], "--lr"), (["--model-ema-decay", "1.1"], "--model-ema-decay"),
            (["--warmup-epochs", "-1"], "--warmup-epochs"), (["--epochs", "0"], "--epochs")]


@pytest.mark.parametrize("flags,name", DEIT_BAD, ids=[" ".join(f) for f, _ in DEIT_BAD])
def test_deit_numbers_out_of_range_are_refused_at_parse_time(flags, name, tmp_path):
    refused([DEIT, "--text_emb=none", f"--output_dir={tmp_path}/out", *flags], name, flags[1])
    assert not os.path.exists(tmp_path / "out")


def test_a_refused_rerun_leaves_the_run_folder_byte_identical(previous_run, image_folder, embeddings, tmp_path):
    before = snapshot(previous_run)
    base = [RESNET, f"--data={image_folder}", f"--text_emb={embeddings}", "-b", "4", "--input-size", "32", "-j", "0",
            f"--save_dir={previous_run}"]
    refused([*base, "-a", "resnet34", "--epochs=2"], "holds a resnet18 model")
    refused([*base, "-a", "resnet18", "--epochs=3"], "run of 2 epochs", "--epochs is 3", "--epochs 2")
    weights = torch.load(previous_run / "checkpoint.pth")["model"]
    torch.save(weights, tmp_path / "classifier.pth")
    refused([*base, "-a", "resnet18", "--epochs=2", f"--resume={tmp_path}/classifier.pth"],
            "classifier.pth", "not a training checkpoint")
    assert snapshot(previous_run) == before


def test_evaluating_the_other_recipes_checkpoint_names_it(previous_run, image_folder, tmp_path):
    state = torch.load(previous_run / "checkpoint.pth")
    state.update(recipe="deit", arch="deit_tiny_patch16_224")
    torch.save(state, tmp_path / "deit.pth")
    err = refused([RESNET, f"--data={image_folder}", "-e", f"--resume={tmp_path}/deit.pth", *SMALL],
                  "deit recipe", "deit/main.py")
    assert len(err) < 300


def test_a_batch_larger_than_the_training_set_is_refused_before_anything_is_written(image_folder, tmp_path):
    refused([RESNET, f"--data={image_folder}", "--text_emb=none", "--epochs=1", *SMALL[:2], "-b", "64",
             "--input-size", "32", "-j", "0", f"--save_dir={tmp_path}/out"], "48 images", "batch of 64")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_corrupt_or_non_object_table_sidecar_is_one_line(content, image_folder, embeddings, tmp_path):
    shutil.copy(embeddings, tmp_path / "emb.pth")
    (tmp_path / "emb.pth.json").write_text(content)
    refused([RESNET, f"--data={image_folder}", f"--text_emb={tmp_path}/emb.pth", "--epochs=1", *SMALL,
             f"--save_dir={tmp_path}/out"], "emb.pth.json")
    assert not os.path.exists(tmp_path / "out")


def test_a_directory_link_that_loops_is_refused_by_training_and_description2embedding(image_folder, tiny_clip,
                                                                                     tmp_path):
    root = tmp_path / "data"
    shutil.copytree(image_folder, root, ignore=shutil.ignore_patterns("*.pth"))
    os.symlink(".", root / "train" / "red_circle" / "loop")
    refused([RESNET, f"--data={root}", "--text_emb=none", "--epochs=1", *SMALL, f"--save_dir={tmp_path}/out"],
            "loop", "symbolic link")
    torch.save(["a description"] * 48, tmp_path / "captions.pth")
    refused([D2E, f"--caption={tmp_path}/captions.pth", f"--model={tiny_clip}", f"--data={root}/train",
             f"--output={tmp_path}/emb.pth", "--workers=0", "--quiet"], "loop")
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "emb.pth")


def test_any_pillow_refusal_names_the_image_decompression_bombs_included(tmp_path, monkeypatch):
    from PIL import Image

    from gpt4image.train.data import load_image
    from gpt4image.errors import UserError
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4,096 pixels > 2 x the limit: DecompressionBombError
    with pytest.raises(UserError, match="big.png.*DecompressionBombError"):
        load_image(str(tmp_path / "big.png"))


def test_a_corrupt_validation_image_loses_no_training_and_the_rerun_evaluates_that_epoch(image_folder, embeddings,
                                                                                        tmp_path):
    root = tmp_path / "data"
    shutil.copytree(image_folder, root, ignore=shutil.ignore_patterns("*.pth"))
    victim = root / "val" / "red_circle" / "val_0001.jpg"
    good = victim.read_bytes()
    victim.write_bytes(b"not a jpeg")
    cmd = [RESNET, f"--data={root}", f"--text_emb={embeddings}", "--epochs=2", *SMALL, f"--save_dir={tmp_path}/run"]
    refused(cmd, "val_0001.jpg")
    saved = torch.load(tmp_path / "run" / "checkpoint.pth")
    assert saved["epoch"] == 0 and saved["unevaluated"]["steps"] == 12  # the whole epoch is kept
    victim.write_bytes(good)
    proc = ran(cmd)
    assert "continuing at epoch 1, step 0" in proc.stdout
    rows = [json.loads(line) for line in open(tmp_path / "run" / "log.txt")]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[0]["train_loss"] == saved["unevaluated"]["loss"]


def test_a_partial_last_log_line_never_blocks_a_resume_and_the_report_names_what_it_skips(previous_run, image_folder,
                                                                                        embeddings):
    with open(previous_run / "log.txt", "a") as f:
        f.write('{"epoch": 1, "lr": 0.0')  # a kill between the write and its newline
    ran([RESNET, f"--data={image_folder}", f"--text_emb={embeddings}", "--epochs=2", *SMALL,
                f"--save_dir={previous_run}"])
    rows = [json.loads(line) for line in open(previous_run / "log.txt")]
    assert [r["epoch"] for r in rows] == [0, 1]
    with open(previous_run / "log.txt", "a") as f:
        f.write('\n\n{"epoch": 2, "broken\n')
    proc = ran(["-m", "gpt4image.report", str(previous_run), "--plot", str(previous_run / "new" / "c.png")])
    assert "2/2 (done)" in proc.stdout
    assert "log.txt:5" in proc.stderr and os.path.isfile(previous_run / "new" / "c.png")


def test_a_full_disk_is_one_line_the_previous_checkpoint_stays_and_the_epoch_is_logged(previous_run, image_folder,
                                                                                      embeddings, capsys, monkeypatch):
    from gpt4image.recipes import resnet as resnet_main
    from gpt4image.errors import exit_on_user_error
    before = (previous_run / "checkpoint.pth").read_bytes()

    def no_space(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(SystemExit) as e:
        exit_on_user_error(resnet_main.main, [f"--data={image_folder}", f"--text_emb={embeddings}", "--epochs=2",
                                              *SMALL, f"--save_dir={previous_run}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "no space left on device" in err, err
    assert "checkpoint.pth" in err
    assert (previous_run / "checkpoint.pth").read_bytes() == before
    assert [json.loads(line)["epoch"] for line in open(previous_run / "log.txt")] == [0, 1]


@pytest.mark.slow
def test_outputs_are_created_with_the_users_umask(image_folder, embeddings, tmp_path):
    subprocess.run([sys.executable, RESNET, f"--data={image_folder}", f"--text_emb={embeddings}", "--epochs=1",
                    *SMALL, f"--save_dir={tmp_path}/run"], check=True, capture_output=True, env=ENV, cwd=REPO,
                   timeout=300, preexec_fn=lambda: os.umask(0o027))  # a cluster group may read, not write
    for name in ("checkpoint.pth", "classifier.pth", "best_model.pth.tar", "args.json", "log.txt"):
        assert os.stat(tmp_path / "run" / name).st_mode & 0o777 == 0o640, name


@pytest.mark.parametrize("case", ["dot-slash duplicate", "json duplicate", "jsonl duplicate", "broken jsonl"])
def test_description_files_with_duplicate_images_or_broken_lines_are_refused(case, image_folder, tiny_clip, tmp_path):
    train = os.path.join(image_folder, "train")
    files = sorted(os.path.relpath(os.path.join(r, f), train) for r, _, fs in os.walk(train) for f in fs)
    if case == "dot-slash duplicate":
        path = tmp_path / "d.json"
        entries = {f: "a description" for f in files}
        path.write_text(json.dumps({**entries, "./" + files[3]: "another"}))
        expected = [files[3], "./" + files[3]]
    elif case == "json duplicate":
        path = tmp_path / "d.json"
        path.write_text("{" + ", ".join(f'"{f}": "x"' for f in files) + f', "{files[0]}": "y"' + "}")
        expected = [files[0], "twice"]
    elif case == "jsonl duplicate":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps({"path": f, "description": "x"}) + "\n" for f in files + [files[2]]))
        expected = [f"d.jsonl:{len(files) + 1}", files[2], "line 3"]
    else:
        path = tmp_path / "d.jsonl"
        lines = [json.dumps({"path": f, "description": "x"}) for f in files]
        lines[4] = lines[4][:-3]
        path.write_text("\n".join(lines) + "\n")
        expected = ["d.jsonl:5"]
    refused([D2E, f"--caption={path}", f"--model={tiny_clip}", f"--data={train}", f"--output={tmp_path}/emb.pth",
             "--workers=0", "--quiet"], *expected)
    assert not os.path.exists(tmp_path / "emb.pth")


def test_description2embedding_never_writes_over_an_input_even_with_force(image_folder, tiny_clip, tmp_path):
    captions = tmp_path / "d.json"
    captions.write_text(json.dumps(["a"] * 48))
    before = captions.read_bytes()
    base = [D2E, f"--model={tiny_clip}", "--workers=0", "--quiet", "--force"]
    refused([*base, f"--caption={captions}", f"--output={captions}"], "input", "d.json")
    refused([*base, f"--caption={captions}", f"--output={tmp_path}/d"], "d.json", "input")  # its sidecar: d.json
    refused([*base, f"--caption={captions}", f"--output={tiny_clip}"], "input")
    assert captions.read_bytes() == before


def test_description2embedding_pickles_cuda_and_several_line_messages(image_folder, tiny_clip, tmp_path):
    torch.save({"texts": ["a"], "obj": torch.nn.Linear(1, 1)}, tmp_path / "module.pth")
    err = refused([D2E, f"--caption={tmp_path}/module.pth", f"--model={tiny_clip}", f"--output={tmp_path}/e.pth",
                   "--workers=0", "--quiet"], "module.pth", "refused")
    assert "weights_only=False" not in err
    if not torch.cuda.is_available():
        refused([D2E, f"--caption={tmp_path}/module.pth", f"--model={tiny_clip}", f"--output={tmp_path}/e.pth",
                 "--device", "cuda"], "--device cuda", "no CUDA", "--device cpu")
    from gpt4image.errors import UserError, one_line
    assert one_line(UserError("first line\n\tsecond line\n third")) == "first line second line third"


def _start(cmd):
    return subprocess.Popen([sys.executable, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV, cwd=REPO)


@pytest.mark.slow
def test_two_runs_into_one_folder_the_second_is_refused_at_once_and_a_stale_lock_is_taken_over(
        image_folder, embeddings, tmp_path):
    import socket
    run = tmp_path / "run"
    cmd = [RESNET, f"--data={image_folder}", f"--text_emb={embeddings}", "--epochs=100", *SMALL, "-p", "1"]
    first = _start([*cmd, f"--save_dir={run}"])
    for line in first.stdout:
        if "epoch 0/100 [2/12]" in line:
            break
    started = time.time()
    refused([*cmd, f"--save_dir={run}"], str(run), "in use by another run", f"process {first.pid}", "run.lock")
    assert time.time() - started < 60
    first.send_signal(signal.SIGTERM)
    first.stdout.read()
    assert first.wait(timeout=300) == 75  # the first run was never disturbed: it stops as asked
    assert not os.path.exists(run / "run.lock")  # and releases the folder
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "job": None}))
    proc = ran([*cmd, f"--save_dir={stale}", "--stop-after=1"])
    printed = proc.stdout + proc.stderr
    assert "taking over a stale lock" in printed and f"process {gone.pid}" in printed
    assert [json.loads(line)["epoch"] for line in open(stale / "log.txt")] == [0]


@pytest.mark.slow
def test_many_short_two_rank_epochs_with_evaluation_and_loader_workers_never_hang(image_folder, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", RESNET,
                           f"--data={image_folder}", "--text_emb=none", "--epochs=12", "-a", "resnet18", "-b", "8",
                           "--input-size", "16", "-j", "2", "-p", "50", f"--save_dir={tmp_path}"],
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(open(tmp_path / "log.txt").read().splitlines()) == 12


@pytest.mark.slow
def test_a_rank_that_stops_making_progress_ends_the_job_with_its_rank_and_phase(image_folder, tmp_path):
    cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", RESNET, f"--data={image_folder}",
           "--text_emb=none", "--epochs=3", *SMALL, "-p", "1", "--stall-timeout=10", f"--save_dir={tmp_path}"]
    agent = _start(cmd)
    output = []
    for line in agent.stdout:
        output.append(line)
        if "[3/6]" in line:
            from conftest import children as _children
            stuck = max(_children(agent.pid))
            os.kill(stuck, signal.SIGSTOP)  # alive but making no progress (a deadlock, a hung device)
            stopped_at = time.time()
            break
    output += agent.stdout.readlines()
    rc = agent.wait(timeout=300)
    try:
        os.kill(stuck, signal.SIGKILL)
    except ProcessLookupError:
        pass
    text = "".join(output)
    assert rc != 0 and "no progress for" in text and "after training epoch 0, step" in text, text[-3000:]
    assert "rank 0" in text or "rank 1" in text
    assert time.time() - stopped_at < 120  # not gloo's 30-minute timeout
