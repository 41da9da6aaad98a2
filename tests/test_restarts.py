"""Runs that continue by themselves: elastic restarts under torchrun, checkpoints inside an epoch,
two torchrun agents as two nodes, and SLURM's SIGUSR1 with --requeue."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ENV, REPO, RESNET, children

SMALL = ["-a", "resnet18", "-b", "4", "--input-size", "32", "-j", "1", "--seed", "0", "-p", "1"]


def _rows(run):
    """log.txt without its timing columns."""
    rows = [json.loads(line) for line in open(os.path.join(run, "log.txt"))]
    return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "images_per_s")} for r in rows]


def _weights(run):
    state = torch.load(os.path.join(run, "checkpoint.pth"))
    return {**{f"model.{k}": v for k, v in state["model"].items()},
            **{f"head.{k}": v for k, v in (state["projection_head"] or {}).items()}}


def _assert_same_run(a, b):
    assert _rows(a) == _rows(b)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _args(image_folder, embeddings, run):
    return [f"--data={image_folder}", f"--text_emb={embeddings}", "--epochs=2", *SMALL, f"--save_dir={run}"]


@pytest.fixture(scope="module")
def straight(two_rank_run):
    """An uninterrupted 2-process run: what every interrupted run below must equal (built once per session)."""
    return two_rank_run


_children = children


def _run_until(cmd, marker, act, env=ENV):
    """Start ``cmd``, call ``act(proc)`` once a line containing ``marker`` is printed, return (rc, output)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    output = []
    for line in proc.stdout:
        output.append(line)
        if marker in line:
            act(proc)
            break
    output += proc.stdout.readlines()
    return proc.wait(timeout=300), "".join(output)


@pytest.mark.slow
def test_a_worker_killed_mid_epoch_is_restarted_by_torchrun_and_the_run_ends_as_an_uninterrupted_one(
        straight, image_folder, embeddings, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=3",
           "--monitor-interval=0.2", RESNET, *_args(image_folder, embeddings, tmp_path),
           "--checkpoint-every-minutes=0.0001"]  # a checkpoint after every step

    def kill_a_worker(agent):
        workers = _children(agent.pid)
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGKILL)  # no handler runs: like an OOM kill or a lost node

    rc, out = _run_until(cmd, "checkpoint at epoch 1, step 3", kill_a_worker)
    assert rc == 0, out[-4000:]
    resumed = [line for line in out.splitlines() if "continuing at epoch 1, step" in line]
    assert resumed, out[-4000:]
    assert int(resumed[0].rsplit("step ", 1)[1]) >= 3  # from inside the epoch, not from its start
    _assert_same_run(straight, tmp_path)


@pytest.mark.slow
def test_without_a_torchrun_restart_the_same_command_continues_from_the_checkpoint_inside_the_epoch(
        straight, image_folder, embeddings, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", RESNET,
           *_args(image_folder, embeddings, tmp_path), "--checkpoint-every-minutes=0.0001"]

    def kill_everything(agent):
        for pid in _children(agent.pid):
            os.kill(pid, signal.SIGKILL)

    rc, _ = _run_until(cmd, "checkpoint at epoch 0, step 4", kill_everything)
    assert rc != 0
    saved = torch.load(tmp_path / "checkpoint.pth")
    assert saved["epoch"] == 0 and saved["step_in_epoch"] >= 4
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"continuing at epoch 0, step {saved['step_in_epoch']}" in rerun.stdout
    _assert_same_run(straight, tmp_path)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_agents_as_two_nodes_train_exactly_as_one_agent_with_two_processes(
        straight, image_folder, embeddings, tmp_path):
    port = _free_port()
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                                f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", RESNET,
                                *_args(image_folder, embeddings, tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=REPO)
              for node in (0, 1)]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "on 2 process(es)" in outputs[0]
    _assert_same_run(straight, tmp_path)


@pytest.mark.slow
def test_slurm_sigusr1_saves_requeues_and_the_requeued_job_continues(image_folder, embeddings, tmp_path):
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = dict(ENV, SLURM_JOB_ID="4242", PATH=f"{bin_dir}:{os.environ['PATH']}")
    args = [f"--data={image_folder}", f"--text_emb={embeddings}", "--epochs=1", *SMALL]

    def usr1(proc):
        proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=USR1@120` sends before the time limit

    rc, out = _run_until([sys.executable, RESNET, *args, f"--save_dir={tmp_path}/plain"], "[2/12]", usr1, env)
    assert rc == 75 and "stopped by SIGUSR1 at epoch 0" in out, out[-3000:]
    assert not calls.exists()  # without --requeue, SLURM is not asked for anything
    cmd = [sys.executable, RESNET, *args, f"--save_dir={tmp_path}/requeued", "--requeue"]
    rc, out = _run_until(cmd, "[2/12]", usr1, env)
    assert rc == 75, out[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    step = torch.load(tmp_path / "requeued" / "checkpoint.pth")["step_in_epoch"]
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)  # the requeued job
    assert again.returncode == 0 and f"continuing at epoch 0, step {step}" in again.stdout, again.stdout[-3000:]
    assert [r["epoch"] for r in _rows(tmp_path / "requeued")] == [0]
