"""A new user's offline try: one command writes the tiny stand-in models, and the "next:" steps the
tools print run as printed on the user's own images, with no download."""
import os
import shlex

import torch

from conftest import tool_main


def _next(out):
    line = next(line for line in out.splitlines() if line.startswith("next: "))
    return shlex.split(line[len("next: "):])


def test_the_tiny_models_command_and_the_printed_next_steps_run_offline(photos, tmp_path, capsys, monkeypatch):
    from gpt4image.tiny_models import main as tiny_models
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    tiny_models(["models"])
    command = _next(capsys.readouterr().out)
    assert command[:2] == ["python", "generate_descriptions.py"] and "YOUR_TRAIN_FOLDER" in command
    argv = [photos if a == "YOUR_TRAIN_FOLDER" else a for a in command[2:]]
    tool_main("generate_descriptions")([*argv, "--max-new-tokens=2", "--workers=0", "--quiet"])
    command = _next(capsys.readouterr().out)
    assert command[:2] == ["python", "description2embedding.py"] and "--model" in command  # the tiny CLIP
    tool_main("description2embedding")([*command[2:], "--workers=0", "--quiet"])
    assert torch.load(tmp_path / "descriptions_text_emb.pth").shape[0] == 13
    assert os.path.isdir(tmp_path / "models" / "tiny_vlm") and os.path.isfile(tmp_path / "models" / "tiny_clip.pt")
