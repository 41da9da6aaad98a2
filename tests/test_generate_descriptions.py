"""generate_descriptions.py on tiny random VLMs of each family: batching, sharding, resume, bad input."""
import importlib.util
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import D2E, REPO, RESNET, built_once, described_paths, kill_once_written, own_generate, ran, run_script
from gpt4image.describe.prompts import DEFAULT_CLASS_PROMPT
from gpt4image.errors import exit_on_user_error
from gpt4image.io import sha256_file
from gpt4image.describe.tiny_vlm import FAMILIES

SCRIPT = os.path.join(REPO, "generate_descriptions.py")


@pytest.fixture
def gd_main():
    sys.path.insert(0, REPO)
    import generate_descriptions
    yield generate_descriptions.main
    sys.path.remove(REPO)


def _records(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_gives_in_batches_what_its_own_generate_gives_one_image_at_a_time(family, vlm, photos, gd_main,
                                                                                      tmp_path):
    out = tmp_path / "d.jsonl"
    gd_main([f"--data={photos}", f"--model={vlm[family]}", f"--output={out}", "--batch-size=5", "--workers=1",
             "--max-new-tokens=6", "--quiet"])
    records = _records(out)
    assert [r["path"] for r in records] == sorted(r["path"] for r in records) and len(records) == 13
    assert all(r["class"] == r["path"].split("/")[0] for r in records)
    for r in records:
        assert r["description"] == own_generate(vlm[family], os.path.join(photos, r["path"]),
                                                 "Describe this image in detail.", 6), r["path"]
    assert len({r["description"] for r in records}) > 1  # the image reaches the model
    meta = json.load(open(f"{out}.json"))
    assert meta["counts"] == {"images": 13, "described": 13, "failed": 0, "empty": 0, "missing": 0}
    assert meta["model"]["model_type"] == json.load(open(os.path.join(vlm[family], "config.json")))["model_type"]
    assert meta["prompt"] == "Describe this image in detail." and meta["generation"]["do_sample"] is False
    assert meta["versions"]["transformers"] and meta["started"] <= meta["finished"]


def test_class_prompt_names_the_class_from_the_class_names_file(vlm, photos, gd_main, tmp_path, capsys):
    names = tmp_path / "LOC_synset_mapping.txt"
    names.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
                     "n01484850 great white shark, white shark\n")
    out = tmp_path / "d.jsonl"
    gd_main([f"--data={photos}", f"--model={vlm['llava']}", f"--output={out}", "--class-prompt",
             f"--class-names={names}", "--max-new-tokens=6", "--workers=0", "--quiet"])
    record = next(r for r in _records(out) if r["class"] == "n01484850")
    prompt = "This is a photo of a great white shark. Describe this image in detail."
    assert record["description"] == own_generate(vlm["llava"], os.path.join(photos, record["path"]), prompt, 6)
    assert (json.load(open(f"{out}.json"))["class_prompt"]
            == "This is a photo of a {class_name}. Describe this image in detail.")


@pytest.fixture(scope="module")
def single_run(vlm, photos, tmp_path_factory):
    def build(folder):
        ran([SCRIPT, f"--data={photos}", f"--model={vlm['qwen2_vl']}", f"--output={folder / 'd.jsonl'}",
             "--max-new-tokens=6", "--workers=0", "--quiet"])
        return str(folder / "d.jsonl")
    return Path(built_once(tmp_path_factory, "single_describe_run", build))


@pytest.mark.slow
def test_two_ranks_describe_every_image_once_and_merge_what_one_process_writes(vlm, photos, single_run, tmp_path):
    out = tmp_path / "d.jsonl"
    run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT, f"--data={photos}",
                f"--model={vlm['qwen2_vl']}", f"--output={out}", "--max-new-tokens=6", "--workers=1",
                "--batch-size=4"])
    described = described_paths(out)
    assert sorted(described) == sorted(set(described)) and len(described) == 13
    assert out.read_bytes() == single_run.read_bytes()


def test_job_array_shards_and_merge_equal_one_process(vlm, photos, single_run, tmp_path, gd_main, capsys):
    out = tmp_path / "d.jsonl"
    common = [f"--data={photos}", f"--model={vlm['qwen2_vl']}", f"--output={out}", "--max-new-tokens=6",
              "--workers=0", "--quiet"]
    for i in range(2):
        gd_main([*common, f"--shard={i}/3"])
    assert not out.exists()
    assert "not described yet" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        exit_on_user_error(gd_main, [*common, "--merge"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "4 of 13 images are not described yet" in err and "shards 2/3" in err and not out.exists()
    gd_main([*common, "--shard=2/3"])  # the last shard to finish merges
    described = described_paths(out)
    assert sorted(described) == sorted(set(described)) and len(described) == 13
    assert out.read_bytes() == single_run.read_bytes()


@pytest.mark.slow
def test_a_run_killed_part_way_resumes_without_describing_an_image_twice(vlm, photos, single_run, tmp_path):
    out = tmp_path / "d.jsonl"
    cmd = [sys.executable, SCRIPT, f"--data={photos}", f"--model={vlm['qwen2_vl']}", f"--output={out}",
           "--max-new-tokens=6", "--workers=0", "--batch-size=1", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    part = tmp_path / "d.jsonl.parts" / "part-00000-of-00001.jsonl"
    assert 4 <= kill_once_written(cmd, part, 4, env) < 13 and not out.exists()
    with open(part, "ab") as f:  # as if the kill came in the middle of a write
        f.write(b'{"path": "n01440764/img_')
    subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True)
    described = described_paths(out)
    assert sorted(described) == sorted(set(described)) and len(described) == 13
    assert out.read_bytes() == single_run.read_bytes()


@pytest.mark.slow
def test_generated_descriptions_become_the_embedding_row_of_their_own_image(vlm, photos, single_run, tiny_clip,
                                                                          tmp_path):
    from gpt4image._compat import import_clip
    from gpt4image.text.clip_text import load_clip
    from gpt4image.train.data import build_image_folders
    from gpt4image.text.tables import WithTextEmbeddings, load_text_embeddings
    clip = import_clip()
    root = str(tmp_path / "data")
    shutil.copytree(photos, os.path.join(root, "train"))
    shutil.copytree(photos, os.path.join(root, "val"))
    table = str(tmp_path / "emb.pth")
    ran([D2E, f"--caption={single_run}", f"--data={root}/train", f"--model={tiny_clip}", f"--output={table}",
         "--workers=0", "--quiet", "--dtype=float32"])
    records = _records(single_run)
    train, _ = build_image_folders(root, None, None)
    paired = WithTextEmbeddings(train, load_text_embeddings(table))
    model = load_clip(tiny_clip, "cpu")
    with torch.no_grad():
        expected = F.normalize(model.encode_text(clip.tokenize([r["description"] for r in records], truncate=True)),
                               dim=-1)
    for k in range(len(records)):
        _, target, text = paired[k]
        assert train.samples[k][0].endswith(records[k]["path"]) and target == train.class_to_idx[records[k]["class"]]
        torch.testing.assert_close(text.float(), expected[k], atol=1e-5, rtol=0)
    ran([RESNET, f"--data={root}", f"--text_emb={table}", "--epochs=1", f"--save_dir={tmp_path}/run", "-a", "resnet18",
         "-b", "4", "--input-size", "32", "-j", "0"], cwd=os.path.join(REPO, "resnet"))
    assert json.loads(open(f"{tmp_path}/run/log.txt").readline())["train_text_loss"] > 0


def test_an_undecodable_image_is_recorded_skipped_and_reported(vlm, photos, tmp_path, gd_main, capsys):
    data = tmp_path / "train"
    shutil.copytree(photos, data)
    (data / "n01440764" / "img_00.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "d.jsonl"
    gd_main([f"--data={data}", f"--model={vlm['blip2']}", f"--output={out}", "--max-new-tokens=4", "--workers=1",
             "--batch-size=4", "--quiet"])
    captured = capsys.readouterr()
    assert "12 of 13 images described; 1 failed" in captured.out
    assert "n01440764/img_00.jpg" in captured.out + captured.err
    meta = json.load(open(f"{out}.json"))
    assert meta["counts"]["failed"] == 1 and meta["failures"][0]["path"] == "n01440764/img_00.jpg"
    assert "UnidentifiedImageError" in meta["failures"][0]["error"]
    assert len(_records(out)) == 12


def _fail(gd_main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        exit_on_user_error(gd_main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_input_is_one_line_exit_2_and_nothing_is_overwritten(vlm, photos, tmp_path, gd_main, capsys):
    from transformers import BertConfig, BertModel
    out = tmp_path / "d.jsonl"
    base = [f"--data={photos}", f"--output={out}", "--workers=0", "--quiet"]
    err = _fail(gd_main, [*base, f"--model={tmp_path}/Qwen2-VL-2B-Instruct"], capsys)
    assert f"{tmp_path}/Qwen2-VL-2B-Instruct" in err and "hf download" in err
    no_processor = tmp_path / "no_processor"
    shutil.copytree(vlm["llava"], no_processor)
    for name in os.listdir(no_processor):
        if "token" in name or "processor" in name or "chat_template" in name:
            os.remove(no_processor / name)
    err = _fail(gd_main, [*base, f"--model={no_processor}"], capsys)
    assert str(no_processor) in err and "processor" in err
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
              ).save_pretrained(tmp_path / "bert")
    capsys.readouterr()
    err = _fail(gd_main, [*base, f"--model={tmp_path}/bert"], capsys)
    assert "'bert' model, not an image-text-to-text model" in err
    err = _fail(gd_main, [f"--data={photos}", f"--model={vlm['llava']}", f"--output={tmp_path}/no/such/d.jsonl"],
                capsys)
    assert f"{tmp_path}/no/such" in err
    err = _fail(gd_main, [*base, f"--model={vlm['llava']}", "--class-prompt=Describe it."], capsys)
    assert "{class_name}" in err
    err = _fail(gd_main, [*base, f"--model={vlm['llava']}", "--shard=3/3"], capsys)
    assert "'3/3'" in err
    err = _fail(gd_main, [f"--data={tmp_path}/nowhere", f"--model={vlm['llava']}", f"--output={out}"], capsys)
    assert f"{tmp_path}/nowhere" in err
    if importlib.util.find_spec("vllm") is None:
        err = _fail(gd_main, [*base, f"--model={vlm['llava']}", "--backend=vllm"], capsys)
        assert "pip install -e .[vllm]" in err and not os.path.exists(f"{out}.parts")
    out.write_bytes(b"precious")
    err = _fail(gd_main, [*base, f"--model={vlm['llava']}"], capsys)
    assert "already exists" in err and "--force" in err and out.read_bytes() == b"precious"
    assert not os.path.exists(f"{out}.parts")
    with pytest.raises(SystemExit) as e:  # argparse's own range check
        gd_main([*base, f"--model={vlm['llava']}", "--batch-size=0"])
    assert e.value.code == 2 and "--batch-size" in capsys.readouterr().err


def test_other_settings_are_not_mixed_into_existing_parts(vlm, photos, tmp_path, gd_main, capsys):
    out = tmp_path / "d.jsonl"
    common = [f"--data={photos}", f"--model={vlm['llava']}", f"--output={out}", "--workers=0", "--quiet",
              "--max-new-tokens=4"]
    gd_main([*common, "--shard=0/2"])
    capsys.readouterr()
    part = out.parent / "d.jsonl.parts" / "part-00000-of-00002.jsonl"
    before = part.read_bytes()
    err = _fail(gd_main, [*common, "--shard=1/2", "--prompt=What is in the picture?"], capsys)
    assert "prompt" in err and "'What is in the picture?'" in err and part.read_bytes() == before


def test_a_list_of_image_paths_is_described_with_paths_as_listed(vlm, photos, tmp_path, gd_main):
    listing = tmp_path / "images.txt"
    names = sorted(os.path.join(c, f) for c in os.listdir(photos) for f in os.listdir(os.path.join(photos, c)))[:4]
    listing.write_text("".join(f"{os.path.join(photos, n)}\n" for n in names[:2]) +
                       "".join(f"{os.path.relpath(os.path.join(photos, n), tmp_path)}\n" for n in names[2:]))
    out = tmp_path / "d.jsonl"
    gd_main([f"--data={listing}", f"--model={vlm['idefics3']}", f"--output={out}", "--max-new-tokens=4",
             "--workers=0", "--quiet"])
    records = _records(out)
    assert [r["path"] for r in records] == listing.read_text().split() and all("class" not in r for r in records)


@pytest.mark.parametrize("prompt, expected", [
    ("This is a {class_name}. Describe it.", "only --class-prompt fills"),
    ("", "is empty"),
    ("  \t ", "is empty"),
])
def test_a_prompt_that_would_be_sent_wrong_is_refused_before_anything_is_written(prompt, expected, vlm, photos,
                                                                                  tmp_path, gd_main, capsys):
    out = tmp_path / "d.jsonl"
    err = _fail(gd_main, [f"--data={photos}", f"--model={vlm['llava']}", f"--output={out}", f"--prompt={prompt}"],
                capsys)
    assert expected in err and os.listdir(tmp_path) == []


def test_merge_refuses_parts_made_with_other_settings_and_class_names_are_compared_by_content(vlm, photos, tmp_path,
                                                                                             gd_main, capsys):
    names = tmp_path / "names.txt"
    names.write_text("n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n")
    out = tmp_path / "d.jsonl"
    common = [f"--data={photos}", f"--model={vlm['llava']}", f"--output={out}", "--max-new-tokens=2", "--workers=0",
              "--quiet", "--class-prompt", f"--class-names={names}"]
    gd_main([*common, "--shard=0/2"])
    names.write_text("n01440764 carp\nn01443537 goldfish\nn01484850 great white shark\n")  # same path, new names
    err = _fail(gd_main, [*common, "--shard=1/2"], capsys)
    assert "class_names_sha256" in err and not os.path.exists(f"{out}.parts/part-00001-of-00002.jsonl")
    names.write_text("n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n")
    gd_main([*common, "--shard=1/2"])
    capsys.readouterr()
    merged = out.read_bytes()  # the last shard to finish merged; merging again must not change the settings
    for other in (["--max-new-tokens=3"], ["--class-prompt=A {class_name}. Describe it."]):
        err = _fail(gd_main, [*common, *other, "--merge", "--force"], capsys)
        assert "made with other settings than this --merge command's" in err and out.read_bytes() == merged
    without_model = [a for a in common if not a.startswith("--model")]
    gd_main([*without_model, "--merge", "--force"])
    meta = json.load(open(f"{out}.json"))
    assert meta["counts"]["described"] == 13 and meta["class_prompt"] == DEFAULT_CLASS_PROMPT
    assert meta["class_names_sha256"] == sha256_file(names) and meta["model"]["name"]


@pytest.mark.slow
def test_ctrl_c_ends_with_one_line_exit_130_and_the_same_command_goes_on(vlm, photos, tmp_path):
    import signal
    out = tmp_path / "d.jsonl"
    cmd = [sys.executable, SCRIPT, f"--data={photos}", f"--model={vlm['llava']}", f"--output={out}",
           "--max-new-tokens=4", "--workers=1", "--batch-size=1", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    part = tmp_path / "d.jsonl.parts" / "part-00000-of-00001.jsonl"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    while proc.poll() is None and not (part.exists() and part.read_bytes().count(b"\n") >= 2):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C does: the whole foreground group, loader worker included
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err and "interrupted" in err and str(out) in err, err
    assert part.read_bytes().endswith(b"\n")  # every record whole
    subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True)
    described = described_paths(out)
    assert sorted(described) == sorted(set(described)) and len(described) == 13


def test_the_next_step_printed_for_a_list_of_images_runs_as_printed(vlm, photos, tiny_clip, tmp_path, gd_main,
                                                                      capsys):
    import shlex
    listing = tmp_path / "images.txt"
    listing.write_text("".join(f"{os.path.join(photos, c, f)}\n" for c in sorted(os.listdir(photos))[:1]
                               for f in sorted(os.listdir(os.path.join(photos, c)))))
    out = tmp_path / "d.jsonl"
    gd_main([f"--data={listing}", f"--model={vlm['llava']}", f"--output={out}", "--max-new-tokens=2",
             "--workers=0", "--quiet"])
    hint = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("next: "))
    argv = shlex.split(hint[len("next: "):])
    assert argv[:2] == ["python", "description2embedding.py"]
    argv = [a for a in argv[2:] if not a.startswith("--model")] + [f"--model={tiny_clip}", "--workers=0", "--quiet"]
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        sys.path.insert(0, REPO)
        import description2embedding
        description2embedding.main(argv)
    finally:
        sys.path.remove(REPO)
        os.chdir(here)
    assert torch.load(tmp_path / "d_text_emb.pth").shape[0] == len(listing.read_text().split())
