"""Descriptions at scale: the quality gate and its retry, the processor's pixel budget, K descriptions
per image from generation to the [N, K, D] table and into training (--text-per-step)."""
import json
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import REPO, built_once
from gpt4image.errors import UserError, exit_on_user_error
from gpt4image.describe.quality import QualityGate, Tally
from gpt4image.describe.tiny_vlm import save_tiny_vlm


@pytest.fixture(scope="module")
def gd_main():
    sys.path.insert(0, REPO)
    import generate_descriptions
    yield generate_descriptions.main
    sys.path.remove(REPO)


@pytest.fixture(scope="module")
def d2e_main():
    sys.path.insert(0, REPO)
    import description2embedding
    yield description2embedding.main
    sys.path.remove(REPO)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return built_once(tmp_path_factory, "at_scale_qwen2_vl",
                      lambda root: save_tiny_vlm("qwen2_vl", str(root / "qwen2_vl")))


def _records(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _fail(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        exit_on_user_error(main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


# --- the quality gate -----------------------------------------------------------------------------

def test_the_gate_names_each_reason_on_constructed_text():
    gate = QualityGate(script="latin")
    good = "A brown dog lies on a green lawn next to a red ball, its head resting on its paws."
    assert gate.check(good, hit_limit=True) == []  # stopped at the limit, but at a sentence end
    assert gate.check("") == ["empty"] and gate.check("   ") == ["empty"]
    assert gate.check("A dog.") == ["too_short"]
    loop = "A dog on a lawn, a dog on a lawn, a dog on a lawn, a dog on a lawn, a dog on a lawn."
    assert gate.check(loop) == ["repetition"]
    assert gate.check("hvhvhvhvhvhvhvhvhvhv", hit_limit=True) == ["too_short", "repetition", "cut"]  # no spaces
    cut = "A brown dog lies on a green lawn next to a red ball and its"
    assert gate.check(cut, hit_limit=True) == ["cut"] and gate.check(cut, hit_limit=False) == []
    russian = "Коричневая собака лежит на зелёной траве рядом с красным мячом."
    assert gate.check(russian) == ["script"] and QualityGate(script="cyrillic").check(russian) == []
    assert QualityGate().check(russian) == []  # no expected script: not checked
    # thresholds are the user's: a stricter share flags a text with one repeated phrase
    once = "A dog on a lawn and a cat, and then a dog on a lawn again near the house."
    assert QualityGate().check(once) == [] and QualityGate(max_repeated_share=0.05).check(once) == ["repetition"]
    tally = Tally(samples=1)
    for text in (good, loop, loop, ""):
        tally.add({"path": "x.jpg", "description": text}, gate.check(text))
    assert tally.counts["repetition"] == 2 and tally.counts["empty"] == 1 and tally.flagged == 3
    assert len(tally.examples["repetition"]) == 1


def test_a_looping_tiny_model_is_flagged_and_a_retry_changes_the_record_and_says_why(qwen, photos, gd_main,
                                                                                      tmp_path, capsys):
    # Greedy decoding of the tiny random Qwen2-VL repeats two letters ("hvhvhv...") until the token
    # limit: a model forced to loop, as small VLMs do on real photos.
    out = tmp_path / "d.jsonl"
    common = [f"--data={photos}", f"--model={qwen}", f"--output={out}", "--max-new-tokens=12", "--workers=0",
              "--quiet", "--force", "--expected-script=cyrillic"]
    gd_main(common)
    first = {r["path"]: r for r in _records(out)}
    assert len(first) == 13
    assert all({"repetition", "too_short", "script"} <= set(r["flags"]) for r in first.values())
    assert any("cut" in r["flags"] and r["hit_max_new_tokens"] for r in first.values())
    meta = json.load(open(f"{out}.json"))
    quality = meta["quality"]
    assert quality["flagged"] == 13 and quality["counts"]["repetition"] == 13 and quality["counts"]["script"] == 13
    assert quality["samples"]["repetition"][0]["description"] == first[quality["samples"]["repetition"][0]["path"]][
        "description"]
    assert meta["counts"] == {"images": 13, "described": 13, "failed": 0, "empty": 0, "missing": 0}
    report = capsys.readouterr().out
    assert "quality gate: 13 descriptions flagged" in report and "repetition:" in report

    gd_main([*common, "--retry-degenerate=sample"])  # seeded sampling with a mild repetition penalty
    retried = {r["path"]: r for r in _records(out)}
    for path, record in retried.items():
        assert record["retry"]["first"] == first[path]["description"]
        assert record["retry"]["because"] == first[path]["flags"]
        assert record["retry"]["settings"] == {"do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                               "repetition_penalty": 1.1}
        assert record["description"] != first[path]["description"], path
    assert json.load(open(f"{out}.json"))["quality"]["retried"] == 13
    parts = tmp_path / "d.jsonl.parts" / "part-00000-of-00001.jsonl"
    before = parts.read_bytes()
    gd_main([*common, "--retry-degenerate=sample"])  # a retried record is not retried again
    assert parts.read_bytes() == before


def test_an_empty_answer_is_counted_as_empty(photos, gd_main, tmp_path):
    model = save_tiny_vlm("qwen2_vl", str(tmp_path / "mute"), min_new_tokens=0)
    config = json.load(open(os.path.join(model, "generation_config.json")))
    eos = config["eos_token_id"]
    config["suppress_tokens"] = [i for i in range(300) if i != eos]  # nothing but the end token
    json.dump(config, open(os.path.join(model, "generation_config.json"), "w"))
    out = tmp_path / "d.jsonl"
    gd_main([f"--data={photos}", f"--model={model}", f"--output={out}", "--max-new-tokens=4", "--workers=0", "--quiet"])
    meta = json.load(open(f"{out}.json"))
    assert meta["counts"]["empty"] == 13 and meta["quality"]["counts"]["empty"] == 13
    assert out.read_text() == ""


# --- the processor's pixel budget ------------------------------------------------------------------

def test_max_pixels_sets_the_number_of_vision_tokens_and_other_values_are_not_mixed(qwen, photos, gd_main, tmp_path,
                                                                                   capsys):
    from transformers import AutoProcessor

    from gpt4image.describe.preprocess import apply_pixel_budget, vision_tokens
    photo = Image.new("RGB", (500, 375), (120, 80, 40))
    processor = AutoProcessor.from_pretrained(qwen)
    prompt = "<|vision_start|><|image_pad|><|vision_end|>Describe."
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = {}
    for max_pixels in (28 * 28 * 1280, 256 * 28 * 28, 64 * 28 * 28, 16 * 28 * 28):
        assert apply_pixel_budget(processor, max_pixels=max_pixels, min_pixels=56 * 56) == (56 * 56, max_pixels)
        inputs = processor(text=[prompt], images=[photo], return_tensors="pt")
        counts[max_pixels] = vision_tokens(inputs)[0]
        assert counts[max_pixels] == int((inputs["input_ids"] == pad).sum())  # what the model is given
        assert counts[max_pixels] <= max_pixels // (28 * 28)
    assert counts[28 * 28 * 1280] == counts[256 * 28 * 28] == 13 * 18  # 500 x 375 -> 504 x 364: 234 tokens
    assert counts[64 * 28 * 28] < 64 and counts[16 * 28 * 28] < 16

    out = tmp_path / "d.jsonl"
    common = [f"--data={photos}", f"--model={qwen}", f"--output={out}", "--max-new-tokens=2", "--workers=0", "--quiet"]
    gd_main([*common, "--max-pixels=12544", "--shard=0/2"])
    settings = json.load(open(tmp_path / "d.jsonl.parts" / "settings.json"))
    assert settings["max_pixels"] == 12544
    part = tmp_path / "d.jsonl.parts" / "part-00000-of-00002.jsonl"
    before = part.read_bytes()
    capsys.readouterr()
    err = _fail(gd_main, [*common, "--max-pixels=50176", "--shard=1/2"], capsys)
    assert "max_pixels: 12544 in the parts, 50176 now" in err and part.read_bytes() == before
    err = _fail(gd_main, [*common, "--shard=1/2"], capsys)  # the model's default is another value too
    assert "max_pixels" in err
    gd_main([*common, "--max-pixels=12544", "--shard=1/2"])
    assert json.load(open(f"{out}.json"))["max_pixels"] == 12544

    llava = save_tiny_vlm("llava", str(tmp_path / "llava"))
    err = _fail(gd_main, [f"--data={photos}", f"--model={llava}", f"--output={tmp_path}/l.jsonl", "--max-pixels=9999",
                          "--workers=0"], capsys)
    assert "CLIPImageProcessor" in err and "--loader-max-pixels" in err


def test_the_loader_shrinks_images_before_the_processor(tmp_path):
    from gpt4image.describe.loading import open_rgb_or_reason as open_rgb
    path = tmp_path / "big.jpg"
    Image.new("RGB", (1600, 1200), (10, 200, 30)).save(path, quality=90)
    image, reason = open_rgb(str(path), max_pixels=200_000)
    assert reason is None and image.width * image.height <= 200_000 and abs(image.width / image.height - 4 / 3) < 0.01
    assert open_rgb(str(path))[0].size == (1600, 1200)


# --- K descriptions per image -------------------------------------------------------------------------

def test_k_descriptions_per_image_land_in_their_rows_of_the_table(qwen, photos, tiny_clip, gd_main, d2e_main,
                                                                 tmp_path, capsys):
    from gpt4image._compat import import_clip
    from gpt4image.text.clip_text import load_clip
    from gpt4image.text.tables import load_text_embeddings
    from conftest import own_generate
    prompts = ["Describe this image in detail.", "What does this {class_name} look like?", "Name one colour."]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "d.jsonl"
    gd_main([f"--data={photos}", f"--model={qwen}", f"--output={out}", f"--prompt-file={prompt_file}",
             "--max-new-tokens=5", "--workers=0", "--quiet", "--batch-size=4"])
    records = _records(out)
    assert [(r["path"], r["k"]) for r in records] == [(p, k) for p in sorted({r["path"] for r in records})
                                                      for k in range(3)]
    for r in records[:3] + records[-3:]:  # description k answers prompt k (class name filled in)
        prompt = prompts[r["k"]].replace("{class_name}", r["class"])
        assert r["description"] == own_generate(qwen, os.path.join(photos, r["path"]), prompt, 5), r
    table = str(tmp_path / "emb.pth")
    d2e_main([f"--caption={out}", f"--data={photos}", f"--model={tiny_clip}", f"--output={table}", "--workers=0",
              "--quiet", "--dtype=float32"])
    emb = torch.load(table)
    assert emb.shape[:2] == (13, 3) and json.load(open(f"{table}.json"))["descriptions_per_image"] == 3
    clip = import_clip()
    model = load_clip(tiny_clip, "cpu")
    for i in (0, 7, 12):
        for j in range(3):
            text = next(r["description"] for r in records if r["path"] == records[3 * i]["path"] and r["k"] == j)
            with torch.no_grad():
                expected = F.normalize(model.encode_text(clip.tokenize([text], truncate=True)), dim=-1)[0]
            torch.testing.assert_close(emb[i, j], expected, atol=1e-5, rtol=0)
    with pytest.raises(UserError, match=r"3 descriptions per image .*--text-per-step"):
        load_text_embeddings(table)  # what needs an [N, D] table says so in one line

    capsys.readouterr()
    err = _fail(gd_main, [f"--data={photos}", f"--model={qwen}", f"--output={tmp_path}/s.jsonl",
                          "--num-descriptions=2", "--workers=0"], capsys)
    assert "--do-sample" in err and "--prompt-file" in err
    sampled = tmp_path / "s.jsonl"
    gd_main([f"--data={photos}", f"--model={qwen}", f"--output={sampled}", "--num-descriptions=2", "--do-sample",
             "--max-new-tokens=8", "--workers=0", "--quiet"])
    texts = {(r["path"], r["k"]): r["description"] for r in _records(sampled)}
    assert len(texts) == 26 and sum(texts[p, 0] != texts[p, 1] for p, _ in texts) > 0


def test_drop_flagged_leaves_out_what_the_gate_flagged_and_training_uses_the_rest(image_folder, tiny_clip, d2e_main,
                                                                                 tmp_path, capsys):
    from gpt4image.train.data import build_image_folders
    from gpt4image.describe.listing import list_image_folder
    from gpt4image.text.tables import WithTextEmbeddings
    from gpt4image.train.text_per_step import keep_described, load_training_table
    files = list_image_folder(f"{image_folder}/train")
    single, several = tmp_path / "one.jsonl", tmp_path / "three.jsonl"
    single.write_text("".join(json.dumps({"path": f, "description": f"photo number {i} of a thing",
                                          **({"flags": ["repetition"]} if i in (3, 10) else {})}) + "\n"
                              for i, f in enumerate(files)))
    several.write_text("".join(json.dumps({"path": f, "k": k, "description": f"photo {i} view {k}",
                                           **({"flags": ["cut"]} if (i, k) in {(5, 0), (5, 1), (9, 1)} else {})}) + "\n"
                               for i, f in enumerate(files) for k in range(3)))
    table = str(tmp_path / "one.pth")
    d2e_main([f"--caption={single}", f"--data={image_folder}/train", f"--model={tiny_clip}", f"--output={table}",
              "--workers=0", "--quiet", "--drop-flagged"])
    assert "2 images left out" in capsys.readouterr().out
    meta = json.load(open(f"{table}.json"))
    assert meta["num_rows"] == len(files) - 2 and meta["drop_flagged"]["images_left_out"] == 2
    train, _ = build_image_folders(image_folder, None, None)
    with pytest.raises(UserError, match="rows but the train set has"):
        WithTextEmbeddings(train, load_training_table(table))
    embeddings = load_training_table(table)
    kept = keep_described(train, embeddings)
    paired = WithTextEmbeddings(kept, embeddings)  # count and file list both check out
    assert len(paired) == len(files) - 2 and files[3] not in {s[0][-len(files[3]):] for s in kept.samples}
    from gpt4image.train.text_targets import TrainingTargets, attach_training_targets
    fewer, rows = attach_training_targets(train, table, False, TrainingTargets(len(train.classes), shots=10))
    assert len(fewer) == len(rows) == 10 * len(train.classes)  # --shots among the described images
    chosen = [fewer.dataset.dataset.samples[int(k)][0] for k in fewer.dataset.indices]
    assert not any(path.endswith(files[i]) for path in chosen for i in (3, 10))  # the flagged ones stay out

    table3 = str(tmp_path / "three.pth")
    d2e_main([f"--caption={several}", f"--data={image_folder}/train", f"--model={tiny_clip}", f"--output={table3}",
              "--workers=0", "--quiet", "--drop-flagged", "--dtype=float32"])
    out = capsys.readouterr().out
    assert "0 images left out, 3 flagged descriptions replaced" in out
    emb = torch.load(table3)
    assert emb.shape[:2] == (len(files), 3)
    assert not torch.equal(emb[9, 0], emb[9, 2])
    for i, j in ((9, 1), (5, 0), (5, 1)):  # replaced by the next unflagged description of the same image
        assert torch.equal(emb[i, j], emb[i, 2])


# --- --text-per-step in training ----------------------------------------------------------------------

class _Indexed(torch.utils.data.Dataset):
    """Sample i is (i, 0): the loader's output names the image each text row belongs to."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor(i), 0


def _choices(table, dataset, world_size, epoch, start=0, workers=0):
    """{image index: k drawn} over all ranks' loaders of one epoch, from ``start`` on in each."""
    from gpt4image.train.data import build_train_loader
    chosen = {}
    for rank in range(world_size):
        sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=True, seed=0, drop_last=True)
        loader, resumable = build_train_loader(dataset, sampler, 2, workers, False, 1000 * rank)
        resumable.set_epoch(epoch, start)
        for images, _, texts in loader:
            for i, text in zip(images.tolist(), texts):
                matches = [k for k in range(table.shape[1]) if torch.equal(text, table[i, k])]
                assert len(matches) == 1
                chosen[i] = matches[0]
    return chosen


def test_sample_draws_the_same_description_after_a_resume_and_on_any_number_of_ranks(tmp_path):
    from gpt4image.text.tables import WithTextEmbeddings
    from gpt4image.train.text_per_step import load_training_table
    n, k = 16, 4
    table = F.normalize(torch.randn(n, k, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    path = str(tmp_path / "emb.pth")
    torch.save(table, path)
    dataset = WithTextEmbeddings(_Indexed(n), load_training_table(path, "sample", seed=3))
    one = {e: _choices(table, dataset, 1, e) for e in (0, 1)}
    assert all(len(c) == n for c in one.values())
    assert one[0] != one[1] and len(set(one[0].values())) > 1  # drawn per epoch, not fixed per image
    assert {e: _choices(table, dataset, 2, e, workers=1) for e in (0, 1)} == one  # 2 ranks, worker processes
    resumed = _choices(table, dataset, 1, 1, start=6)  # a run resumed at sample 6 of epoch 1
    assert len(resumed) == n - 6 and all(one[1][i] == c for i, c in resumed.items())
    other_seed = WithTextEmbeddings(_Indexed(n), load_training_table(path, "sample", seed=4))
    assert _choices(table, other_seed, 1, 0) != one[0]

    mean = load_training_table(path, "mean")
    torch.testing.assert_close(mean[5], F.normalize(table[5].mean(0), dim=0))
    with pytest.raises(UserError, match="--text-per-step mean or --text-per-step sample"):
        load_training_table(path)
    flat = str(tmp_path / "flat.pth")
    torch.save(table[:, 0], flat)
    with pytest.raises(UserError, match="drop --text-per-step"):
        load_training_table(flat, "mean")
    from gpt4image.train.data import attach_text_embeddings
    with pytest.raises(UserError, match="--text_emb none"):  # the baseline has no descriptions to choose among
        attach_text_embeddings(_Indexed(n), "none", False, "mean")


def test_both_recipes_train_on_k_descriptions_and_sample_resumes_exactly(image_folder, tmp_path):
    from gpt4image.recipes import deit as deit_main
    from gpt4image.recipes import resnet as resnet_main
    n = 48  # the image_folder fixture's training images
    table = F.normalize(torch.randn(n, 3, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    path = str(tmp_path / "emb.pth")
    torch.save(table, path)
    common = [f"--data={image_folder}", f"--text_emb={path}", "-j", "0", "-a", "resnet18", "-b", "8",
              "--input-size", "32", "-p", "2", "--seed", "0", "--epochs=2", "--text-per-step=sample"]
    resnet_main.main([*common, f"--save_dir={tmp_path}/straight"])
    resnet_main.main([*common, f"--save_dir={tmp_path}/resumed", "--stop-after=1"])
    resnet_main.main([*common, f"--save_dir={tmp_path}/resumed"])
    a = torch.load(tmp_path / "straight" / "checkpoint.pth")
    b = torch.load(tmp_path / "resumed" / "checkpoint.pth")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    deit_main.main([f"--data-path={image_folder}", f"--text_emb={path}", "--num_workers=0", "--model",
                    "deit_tiny_patch16_224", "--input-size", "32", "--batch-size", "8", "--epochs=1",
                    "--text-per-step=mean", f"--output_dir={tmp_path}/deit"])
    log = json.loads(open(tmp_path / "deit" / "log.txt").readline())
    assert log["train_text_loss"] > 0
    shutil.rmtree(tmp_path / "straight")


def test_the_merge_index_finds_each_records_key_and_marks_as_decoding_would(tmp_path):
    from gpt4image.describe.parts import Parts, _fast_key, _marks
    from gpt4image.describe.records import record_key
    records = [{"path": "a/1.jpg", "description": 'he said "error": no', "class": "a"},
               {"path": 'b/"odd\\name.jpg', "description": "x"},
               {"path": "c/3.jpg", "k": 12, "description": "y", "retry": {"first": "z"}},
               {"path": "c/3.jpg", "k": 2, "error": "empty description"},
               {"path": "d/\u00e9t\u00e9.jpg", "k": 0, "description": "\u00e9"}]
    for record in records:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        assert (_fast_key(line) or record_key(json.loads(line))) == record_key(record)
        assert set(_marks(line)) == {"error", "retry"} & set(record)
    parts = Parts(str(tmp_path / "d.jsonl"))
    os.makedirs(parts.directory)
    with open(parts.part_path(0, 1), "w", encoding="utf-8") as f:  # a retry wins over the record it retried
        f.write(json.dumps({"path": "a.jpg", "description": "loop loop", "flags": ["too_short"]}) + "\n")
        f.write(json.dumps({"path": "a.jpg", "description": "Fixed.", "retry": {"first": "loop loop"}}) + "\n")
        f.write('{"path": "b.jpg", "descr')  # a line cut by a kill
    assert parts.index()["a.jpg"][2] == ("retry",) and "b.jpg" not in parts.index()
