"""Runs that survive faults, and bad input answered with one clear line before anything is written."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from gpt4image.errors import exit_on_user_error

RESNET = os.path.join(REPO, "resnet", "main.py")
SMALL = ["-a", "resnet18", "-b", "4", "--input-size", "32", "-j", "1", "--seed", "0"]


def _log(d):
    return [json.loads(line) for line in open(os.path.join(d, "log.txt"))]


def _strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "images_per_s")} for r in rows]


def _same_weights(a, b):
    a, b = torch.load(a), torch.load(b)
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and \
        all(torch.equal(a["projection_head"][k], b["projection_head"][k]) for k in a["projection_head"])


def _torchrun(args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", RESNET, *args]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_epoch_stops_at_a_step_and_the_same_command_continues_exactly(sig, image_folder, embeddings,
                                                                                 two_rank_run, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = [f"--data={image_folder}", f"--text_emb={embeddings}", "--epochs=2", "-p", "1", *SMALL]
    straight = two_rank_run  # the same arguments, uninterrupted (built once per session)
    cmd = _torchrun([*args, f"--save_dir={tmp_path}/stopped"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    output = []
    for line in proc.stdout:
        output.append(line)
        if "epoch 1/2 [2/6]" in line:
            os.killpg(proc.pid, sig)  # like a scheduler or Ctrl-C: every process of the job gets it
            break
    output += proc.stdout.readlines()
    assert proc.wait(timeout=120) != 0
    text = "".join(output)
    assert f"stopped by {signal.Signals(sig).name} at epoch 1, step" in text, text[-3000:]
    stopped = torch.load(tmp_path / "stopped" / "checkpoint.pth")
    assert stopped["epoch"] == 1 and 2 <= stopped["step_in_epoch"] < 6
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"continuing at epoch 1, step {stopped['step_in_epoch']}" in rerun.stdout
    assert _same_weights(straight / "checkpoint.pth", tmp_path / "stopped" / "checkpoint.pth")
    assert _strip_timing(_log(straight)) == _strip_timing(_log(tmp_path / "stopped"))


@pytest.mark.slow
def test_a_single_process_stopped_by_sigterm_exits_75(image_folder, embeddings, tmp_path):
    cmd = [sys.executable, RESNET, f"--data={image_folder}", f"--text_emb={embeddings}", "--epochs=1", "-p", "1",
           *SMALL, f"--save_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    for line in proc.stdout:
        if "[2/12]" in line:
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    assert proc.wait(timeout=120) == 75
    assert torch.load(tmp_path / "checkpoint.pth")["step_in_epoch"] >= 2


_WRITER = """
import sys, torch
from gpt4image.io import atomic_torch_save
i = 0
while True:
    i += 1
    atomic_torch_save({"version": i, "weights": torch.full((4_000_000,), float(i))}, sys.argv[1])
    print(i, flush=True)
"""


@pytest.mark.slow
def test_sigkill_while_a_checkpoint_is_written_never_leaves_a_broken_file(tmp_path):
    path = tmp_path / "checkpoint.pth"
    for delay in (0.05, 0.2, 0.35, 0.6, 0.9):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # one complete checkpoint exists
        time.sleep(delay)
        proc.kill()
        proc.wait()
        state = torch.load(path)  # readable, and internally consistent
        assert torch.all(state["weights"] == float(state["version"]))


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_whole_job_quickly(image_folder, tmp_path):
    script = tmp_path / "one_rank_fails.py"
    script.write_text(
        "import os, sys, time\n"
        "import torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "if dist.get_rank() == 1:\n"
        "    raise RuntimeError('rank 1 failed')\n"
        "dist.barrier()\n"
        "time.sleep(600)\n")
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and time.time() - started < 120
    # the same with the recipe: a corrupt image kills the rank whose shard holds it; the other one must not hang
    root = tmp_path / "data"
    shutil.copytree(image_folder, root, ignore=shutil.ignore_patterns("*.pth"))
    (root / "train" / "red_circle" / "train_0005.jpg").write_bytes(b"broken")
    started = time.time()
    proc = subprocess.run(_torchrun([f"--data={root}", "--text_emb=none", "--epochs=3", *SMALL,
                                     f"--save_dir={tmp_path}/run"]), capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0 and time.time() - started < 120
    assert "train_0005.jpg" in proc.stdout + proc.stderr


def _fails(capsys, argv, *expected):
    from gpt4image.recipes import resnet as resnet_main
    with pytest.raises(SystemExit) as e:
        exit_on_user_error(resnet_main.main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for text in expected:
        assert text in err, err
    return err


@pytest.fixture
def folder_copy(image_folder, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(os.path.join(image_folder, "train"), root / "train")
    shutil.copytree(os.path.join(image_folder, "val"), root / "val")
    return root


def test_wrong_row_count_and_bad_rows(capsys, folder_copy, embeddings, tmp_path):
    base = [f"--data={folder_copy}", "--epochs=1", *SMALL, "-j", "0", f"--save_dir={tmp_path}/run"]
    table = torch.load(embeddings)
    torch.save(table[:-2], tmp_path / "short.pth")
    _fails(capsys, [*base, f"--text_emb={tmp_path}/short.pth"], "46 rows", "48 samples")
    bad = table.clone()
    bad[7, 0] = float("inf")
    torch.save(bad, tmp_path / "inf.pth")
    _fails(capsys, [*base, f"--text_emb={tmp_path}/inf.pth"], "row 7 is not finite", "inf.pth")
    torch.save(table * 2, tmp_path / "norm.pth")
    _fails(capsys, [*base, f"--text_emb={tmp_path}/norm.pth"], "row 0 has norm 2.0")
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pth")


def test_a_renamed_or_added_training_image_is_caught_by_the_file_list(capsys, folder_copy, embeddings, tmp_path):
    shutil.copy(embeddings, tmp_path / "emb.pth")
    shutil.copy(embeddings + ".json", tmp_path / "emb.pth.json")
    shutil.copy(embeddings + ".files.txt", tmp_path / "emb.pth.files.txt")
    first = sorted(os.listdir(folder_copy / "train" / "blue_triangle"))[0]
    os.rename(folder_copy / "train" / "blue_triangle" / first, folder_copy / "train" / "blue_triangle" / ("z" + first))
    base = [f"--data={folder_copy}", "--epochs=1", *SMALL, "-j", "0", f"--save_dir={tmp_path}/run",
            f"--text_emb={tmp_path}/emb.pth"]
    _fails(capsys, base, "train folder's files differ", "sample 0", first)
    shutil.copy(folder_copy / "train" / "blue_triangle" / ("z" + first),
                folder_copy / "train" / "blue_triangle" / first)
    _fails(capsys, base, "49 samples")  # one added


def test_corrupt_images_are_named_or_skipped_and_counted(capsys, folder_copy, embeddings, tmp_path):
    victim = folder_copy / "train" / "green_square" / "train_0003.jpg"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated JPEG
    base = [f"--data={folder_copy}", "--epochs=1", *SMALL, "-j", "1", f"--text_emb={embeddings}"]
    _fails(capsys, [*base, f"--save_dir={tmp_path}/a"], "cannot decode image", "train_0003.jpg",
           "--skip-corrupt-images")
    from gpt4image.recipes import resnet as resnet_main
    resnet_main.main([*base, f"--save_dir={tmp_path}/b", "--skip-corrupt-images"])
    assert _log(tmp_path / "b")[0]["train_corrupt_images_skipped"] >= 1
    val_victim = folder_copy / "val" / "red_circle" / "val_0001.jpg"
    val_victim.write_bytes(b"not a jpeg")
    _fails(capsys, [*base, f"--save_dir={tmp_path}/c", "--skip-corrupt-images"], "val_0001.jpg")


def test_folder_layout_errors(capsys, folder_copy, embeddings, tmp_path):
    base = ["--epochs=1", *SMALL, "-j", "0", f"--save_dir={tmp_path}/run", "--text_emb=none"]
    os.rename(folder_copy / "val" / "red_circle", folder_copy / "val" / "red_disc")
    _fails(capsys, [f"--data={folder_copy}", *base], "classes", "red_disc", "red_circle")
    shutil.rmtree(folder_copy / "val")
    _fails(capsys, [f"--data={folder_copy}", *base], "val", "does not exist")
    (tmp_path / "afile").write_text("x")
    _fails(capsys, [f"--data={os.path.dirname(embeddings)}", *base], "train")
    _fails(capsys, ["--epochs=1", *SMALL, "-j", "0", "--text_emb=none", f"--save_dir={tmp_path}/afile/run",
                    "--generated-size", "8", "8", "--num-classes", "2"], "cannot write", "afile")


def test_checkpoints_of_another_width_architecture_or_recipe_are_refused_untouched(capsys, image_folder, embeddings,
                                                                                 tmp_path):
    from gpt4image.recipes import resnet as resnet_main
    run = tmp_path / "run"
    common = [f"--data={image_folder}", "--epochs=2", "-b", "4", "--input-size", "32", "-j", "0"]
    resnet_main.main([*common, "-a", "resnet18", f"--text_emb={embeddings}", f"--save_dir={run}", "--stop-after=1"])
    before = (run / "checkpoint.pth").read_bytes()
    torch.save(F.normalize(torch.randn(48, 32), dim=-1), tmp_path / "w32.pth")
    _fails(capsys, [*common, "-a", "resnet18", f"--text_emb={tmp_path}/w32.pth", f"--save_dir={run}"],
           "64-d text embeddings", "32-d")
    _fails(capsys, [*common, "-a", "resnet34", f"--text_emb={embeddings}", f"--save_dir={run}"],
           "holds a resnet18 model")
    ckpt = torch.load(run / "checkpoint.pth")
    ckpt["recipe"] = "deit"
    torch.save(ckpt, tmp_path / "deit.pth")
    _fails(capsys, [*common, "-a", "resnet18", f"--text_emb={embeddings}", f"--save_dir={tmp_path}/x",
                    f"--resume={tmp_path}/deit.pth"], "deit recipe", "deit/main.py")
    assert (run / "checkpoint.pth").read_bytes() == before


def test_a_non_finite_loss_stops_with_epoch_step_and_term_and_keeps_the_checkpoint(capsys, image_folder, embeddings,
                                                                                  tmp_path):
    from gpt4image.recipes import resnet as resnet_main
    run = tmp_path / "run"
    common = [f"--data={image_folder}", f"--text_emb={embeddings}", "--epochs=2", *SMALL, "-j", "0", "-p", "1",
              f"--save_dir={run}"]
    resnet_main.main([*common, "--stop-after=1"])
    ckpt = torch.load(run / "checkpoint.pth")
    for group in ckpt["optimizer"]["param_groups"]:
        group["lr"] = 1e30  # the next epoch diverges at once
    torch.save(ckpt, run / "checkpoint.pth")
    before = (run / "checkpoint.pth").read_bytes()
    _fails(capsys, common, "non-finite", "loss", "at epoch 1, step")
    assert (run / "checkpoint.pth").read_bytes() == before
    assert len(_log(run)) == 1
