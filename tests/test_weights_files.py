"""Weights that are cut short, corrupt, or pickles that would run code, in every place a tool loads
weights (generate_descriptions' model folder, description2embedding's hf: folders, open_clip and
OpenAI CLIP weights files): one line naming the file and what is wrong, exit code 2, and the code in
an unsafe pickle never runs."""
import os
import shutil

import pytest
import torch

from conftest import tool_main
from gpt4image.errors import exit_on_user_error
from gpt4image.synthetic import save_tiny_hf_text_encoder, save_tiny_open_clip


class RunsCode:
    """Unpickling this calls os.system: the file holds code that would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def sources(vlm, tiny_clip, tmp_path_factory):
    """entry point -> (the weights folder or file as made, how to run the tool on a copy of it)."""
    root = tmp_path_factory.mktemp("encoders")
    open_clip_spec = save_tiny_open_clip(str(root / "open_clip"))
    bert = save_tiny_hf_text_encoder("bert", str(root / "bert"))[len("hf:"):]
    return {"generate_descriptions": vlm["llava"], "hf": bert, "open_clip": open_clip_spec, "openai_clip": tiny_clip}


def _argv(entry, weights, tmp_path, photos):
    captions = tmp_path / "c.json"
    captions.write_text('["a red circle", "a blue square"]')
    d2e = [f"--caption={captions}", f"--output={tmp_path}/o.pth", "--workers=0", "--quiet"]
    if entry == "generate_descriptions":
        return "generate_descriptions", [f"--data={photos}", f"--model={weights}", f"--output={tmp_path}/d.jsonl"]
    if entry == "hf":
        return "description2embedding", [*d2e, f"--model=hf:{weights}"]
    if entry == "open_clip":
        return "description2embedding", [*d2e, f"--model={weights}"]
    return "description2embedding", [*d2e, f"--model={weights}"]


def _spoil(entry, source, kind, tmp_path):
    """A copy of ``source`` whose weights are truncated or a pickle that runs code; returns
    (what to pass, the spoiled file)."""
    marker = tmp_path / "code-ran"
    if entry in ("generate_descriptions", "hf"):
        folder = tmp_path / "model"
        shutil.copytree(source, folder)
        weights = folder / "model.safetensors"
        if kind == "truncated":
            data = weights.read_bytes()
            weights.write_bytes(data[:len(data) // 2])
            return str(folder), weights
        from safetensors.torch import load_file
        state = load_file(weights)
        weights.unlink()
        target = folder / "pytorch_model.bin"
        torch.save({**state, "extra": RunsCode(marker)}, target)
        return str(folder), target
    if entry == "open_clip":
        _, config, file = source.split(":")
        target = tmp_path / os.path.basename(file)
        spec = f"open_clip:{config}:{target}"
    else:
        file = source
        target = tmp_path / os.path.basename(file)
        spec = str(target)
    if kind == "truncated":
        data = open(file, "rb").read()
        target.write_bytes(data[:len(data) // 2])
    else:
        torch.save({"state_dict": torch.load(file, weights_only=True), "extra": RunsCode(marker)}, target)
    return spec, target


@pytest.mark.parametrize("kind", ["truncated", "runs code"])
@pytest.mark.parametrize("entry", ["generate_descriptions", "hf", "open_clip", "openai_clip"])
def test_bad_weights_are_one_line_naming_the_file_and_code_in_them_never_runs(entry, kind, sources, photos, tmp_path,
                                                                             capsys):
    weights, spoiled = _spoil(entry, sources[entry], kind, tmp_path)
    tool, argv = _argv(entry, weights, tmp_path, photos)
    with pytest.raises(SystemExit) as e:
        exit_on_user_error(tool_main(tool), argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(spoiled) in err, err
    if kind == "truncated":
        assert "truncated" in err, err
    else:
        assert "holds code that would run" in err and "not loaded" in err, err
        assert "os.system" in err or "posix.system" in err, err
        assert "weights_only" not in err and "not a pickle" not in err, err
    assert not (tmp_path / "code-ran").exists()
    assert not (tmp_path / "o.pth").exists() and not (tmp_path / "d.jsonl.parts").exists()


def _evil_plain_pickle(path, marker):
    import pickle
    path.write_bytes(pickle.dumps({"w": [1.0], "extra": RunsCode(marker)}, protocol=4))


@pytest.mark.parametrize("kind, expected", [
    ("zip", None), ("legacy", None), ("torchscript", None), ("junk", "not a file torch.save writes"),
    ("zip+code", "holds code that would run"), ("legacy+code", "holds code that would run"),
    ("plain pickle+code", "holds code that would run"), ("module", "holds code that would run"),
])
def test_every_pickle_layout_is_read_without_running_it(kind, expected, tmp_path):
    from gpt4image.weights import file_problem
    marker = tmp_path / "code-ran"
    path = tmp_path / "w.pt"
    state = {"w": torch.zeros(3), "p": torch.nn.Parameter(torch.ones(2)), "size": torch.Size([2])}
    if kind == "zip":
        torch.save(state, path)
    elif kind == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif kind == "torchscript":
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    elif kind == "junk":
        path.write_bytes(b"hello, this is text and not weights\n")
    elif kind == "zip+code":
        torch.save({**state, "x": RunsCode(marker)}, path)
    elif kind == "legacy+code":
        torch.save({**state, "x": RunsCode(marker)}, path, _use_new_zipfile_serialization=False)
    elif kind == "plain pickle+code":
        _evil_plain_pickle(path, marker)
    else:
        torch.save({"texts": ["a"], "obj": torch.nn.Linear(1, 1)}, path)
    problem = file_problem(str(path))
    assert (problem is None) if expected is None else (expected in problem), problem
    if problem and "code" in problem:
        assert "not a pickle" not in problem and "weights_only" not in problem and "not loaded" in problem
    assert not marker.exists()
