"""The main job on built-in data, and the report that compares runs."""
import json
import os

import pytest

from conftest import process_state_restored, ran


def _stage_in_this_process(cmd, cwd, env=None):
    """The demo's runner for one stage (``python script ...`` or ``python -m torch.distributed.run
    --standalone --nproc_per_node=1 script ...``), run in this process: the same command line, without
    an interpreter start per stage (the scripts and torchrun as processes are tested elsewhere)."""
    import sys
    args = list(cmd[1:])
    if args[:2] == ["-m", "torch.distributed.run"]:
        assert args[2:4] == ["--standalone", "--nproc_per_node=1"], args[:4]
        args = args[4:]
    print("$ " + " ".join(cmd), flush=True)
    with process_state_restored():  # each stage starts as a fresh process would
        stage = ran(args, cwd=cwd)
    sys.stdout.write(stage.stdout)


@pytest.mark.slow
def test_the_demo_runs_the_whole_pipeline_learns_the_task_and_says_what_it_cannot_show(tmp_path, monkeypatch):
    # What only this test checks: the demo's stages wired together, its default settings learning the
    # task, its table, explanation, plot and clean-up. It runs the stages in this process and each run on
    # 1 process instead of 2 (torchrun's 2-rank runs of both recipes are tested in test_resnet/test_deit;
    # with 3 epochs instead of 5, DeiT's raw top-1 stays under 90 %).
    import math
    from gpt4image import demo
    monkeypatch.setattr(demo, "_run", _stage_in_this_process)
    out = ran(["-m", "gpt4image.demo", f"--out={tmp_path}", "--nproc=1"]).stdout
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 4  # header and the four runs
    assert "resnet_gpt4image" in out and "deit_baseline" in out and "eff. 0.3" in out
    for run in ("resnet_baseline", "resnet_gpt4image", "deit_baseline", "deit_gpt4image"):
        rows = [json.loads(line) for line in open(tmp_path / "runs" / run / "log.txt")]
        assert rows[-1]["test_acc1"] >= 90, (run, rows[-1]["test_acc1"])  # every run learns the task
        assert rows[-1]["test_num_images"] == 200
        if run.endswith("gpt4image"):
            chance = math.log(16 * 1)  # global batch of the clip loss
            assert rows[-1]["train_text_loss"] < chance - 0.2, (run, rows[-1]["train_text_loss"])
        assert os.path.isfile(tmp_path / "runs" / run / "classifier.pth")
        assert not os.path.exists(tmp_path / "runs" / run / "checkpoint.pth")  # cleaned up
    assert "cannot show the method's benefit" in out and "chance: ln(16)" in out
    assert os.path.getsize(tmp_path / "curves.png") > 10_000
    assert out.strip().splitlines()[-1].startswith("  curves")
    left = float(out.split("it leaves ")[1].split(" MB")[0])
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp_path) for f in fs) / 2 ** 20
    assert abs(left - total) < 1 and left < 200
    meta = json.load(open(tmp_path / "text_emb.pth.json"))
    assert meta["num_rows"] == 256


def test_report_shows_an_unfinished_run_with_what_it_has(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    json.dump({"arch": "resnet50", "epochs": 120, "text_emb": "t.pth", "loss_type": "clip", "lamb": 0.3, "tau": 0.2,
               "gather_with_grad": False, "local_loss": False, "world_size": 4, "input_size": 224},
              open(run / "args.json", "w"))
    rows = [{"epoch": e, "test_acc1": 10.0 + e, "train_ce_loss": 5.0, "train_text_loss": 3.0, "images_per_s": 900.0}
            for e in range(3)]
    (run / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 3, "test_a')  # died mid-write
    proc = ran(["-m", "gpt4image.report", str(run), "--plot", str(tmp_path / "c.png")])
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("| run |")][0]
    assert "best top-1" in line
    assert "3/120 (incomplete)" in proc.stdout and "eff. 0.075" in proc.stdout and "| 12.00 |" in proc.stdout
    assert os.path.isfile(tmp_path / "c.png")
