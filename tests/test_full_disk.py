"""A full disk is one line and exit code 2 in every tool, on a real file system that runs out of space
(a 200 KiB tmpfs; skipped where mounting is not permitted), and nothing half written is left behind:
torch.save reports it as a RuntimeError ("unexpected pos"), not as OSError(ENOSPC)."""
import errno
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from gpt4image.errors import UserError, exit_on_user_error

SMALL = ["-a", "resnet18", "-b", "4", "--input-size", "32", "-j", "0", "--seed", "0"]
TINY_DEIT = ["--model", "deit_tiny_patch16_224", "--input-size", "32", "--batch-size", "8", "-p", "2", "--seed", "0",
             "--num_workers", "0", "--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0"]


@pytest.fixture
def disk(tmp_path):
    """A 200 KiB file system at ``tmp_path/disk``, unmounted afterwards."""
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder, leave=0):
    """Fill the file system of ``folder`` up to ``leave`` bytes; returns the filler file."""
    filler = os.path.join(folder, "filler")
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    if leave:
        os.truncate(filler, os.path.getsize(filler) - leave)
    return filler


def test_torch_save_on_a_full_disk_raises_a_runtime_error_that_counts_as_a_failed_write(disk):
    from gpt4image.io import is_write_failure
    fill(disk)
    with pytest.raises(RuntimeError) as e:
        torch.save(torch.zeros(10_000), disk / "x.pth")
    assert "unexpected pos" in str(e.value) or "write failed" in str(e.value)
    assert is_write_failure(e.value)


def test_an_append_cut_short_by_a_full_disk_leaves_the_file_as_it_was(disk):
    from gpt4image.io import append_durably
    part = disk / "part.jsonl"
    part.write_bytes(b'{"path": "a"}\n')
    fill(disk, leave=4096)
    with pytest.raises(UserError, match="no space left on device"):
        append_durably(str(part), b'{"path": "b", "description": "' + b"x" * 20_000 + b'"}\n')
    assert part.read_bytes() == b'{"path": "a"}\n'


def _main(tool):
    import importlib
    if tool in ("description2embedding", "generate_descriptions"):
        sys.path.insert(0, REPO)
        try:
            return importlib.import_module(tool).main
        finally:
            sys.path.remove(REPO)
    return importlib.import_module(f"gpt4image.recipes.{tool}").main


def _one_line_exit_2(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        exit_on_user_error(main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "no space left on device" in err, err
    return err


@pytest.mark.parametrize("recipe", ["resnet", "deit"])
def test_training_on_a_full_disk_is_one_line_naming_the_checkpoint(recipe, disk, image_folder, embeddings, capsys):
    if recipe == "resnet":
        argv = [f"--data={image_folder}", f"--text_emb={embeddings}", "--epochs=1", *SMALL, f"--save_dir={disk}/run"]
    else:
        argv = [f"--data-path={image_folder}", f"--text_emb={embeddings}", "--epochs=1", *TINY_DEIT,
                f"--output_dir={disk}/run"]
    err = _one_line_exit_2(_main(recipe), argv, capsys)
    assert ".pth" in err
    assert not [n for n in os.listdir(disk / "run") if n.endswith(".tmp")]  # no temporary file left


def test_description2embedding_on_a_full_disk_is_one_line_and_writes_nothing(disk, image_folder, tiny_clip, capsys):
    fill(disk)
    out = disk / "emb.pth"
    err = _one_line_exit_2(_main("description2embedding"), [f"--caption={image_folder}/captions.pth",
                                                              f"--model={tiny_clip}", f"--output={out}",
                                                              "--workers=0", "--quiet"], capsys)
    assert str(out) in err or "emb.pth" in err
    assert sorted(os.listdir(disk)) == ["filler"]


def test_generate_descriptions_on_a_disk_that_fills_up_is_one_line_and_the_same_command_goes_on(
        disk, vlm, photos, capsys, monkeypatch):
    from gpt4image.describe.parts import Parts
    out = disk / "d.jsonl"
    argv = [f"--data={photos}", f"--model={vlm['llava']}", f"--output={out}", "--max-new-tokens=2", "--workers=0",
            "--quiet", "--batch-size=4"]
    prepare = Parts.append_path
    filled = []

    def fill_then_prepare(self, index, count):  # another program fills the disk once describing starts
        filled.append(fill(disk))
        return prepare(self, index, count)
    monkeypatch.setattr(Parts, "append_path", fill_then_prepare)
    main = _main("generate_descriptions")
    _one_line_exit_2(main, argv, capsys)
    part = disk / "d.jsonl.parts" / "part-00000-of-00001.jsonl"
    assert not part.exists() or part.read_bytes() in (b"",) or part.read_bytes().endswith(b"\n")
    monkeypatch.setattr(Parts, "append_path", prepare)
    os.unlink(filled[0])
    main(argv)
    assert len(out.read_text().splitlines()) == 13
