"""description2embedding.py end to end on a tiny random CLIP, and its answers to bad input."""
import json
import os
import random
import string

import pytest
import torch
import torch.nn.functional as F

from conftest import D2E, ran, run_script
from gpt4image._compat import import_clip
from gpt4image.text.clip_text import Tokenizer, load_clip
from gpt4image.io import sha256_file, sha256_lines

clip = import_clip()


def test_rows_equal_clip_encode_text_of_each_description(image_folder, tiny_clip, embeddings):
    texts = torch.load(os.path.join(image_folder, "captions.pth"))
    table = torch.load(embeddings)
    assert table.dtype == torch.float16
    assert table.shape == (len(texts), 64)
    assert torch.allclose(table.float().norm(dim=1), torch.ones(len(texts)), atol=2e-3)
    model = load_clip(tiny_clip, "cpu")
    with torch.no_grad():
        reference = F.normalize(model.encode_text(clip.tokenize(texts, truncate=True)).float(), dim=-1)
    torch.testing.assert_close(table.float(), reference, atol=2e-3, rtol=0)
    # row k is description k, not merely some description: neighbours differ
    assert not torch.allclose(table[0].float(), table[-1].float(), atol=1e-2)


def test_metadata_counts_truncation_and_records_the_file_list(image_folder, embeddings):
    texts = torch.load(os.path.join(image_folder, "captions.pth"))
    meta = json.load(open(embeddings + ".json"))
    tokenizer = clip.clip._tokenizer
    expected_truncated = sum(len(tokenizer.encode(t)) + 2 > 77 for t in texts)
    assert expected_truncated > 0
    assert meta["num_truncated"] == expected_truncated
    assert meta["num_rows"] == len(texts) and meta["embedding_dim"] == 64
    assert meta["dtype"] == "float16"
    assert meta["source_sha256"] == sha256_file(os.path.join(image_folder, "captions.pth"))
    files = open(os.path.join(os.path.dirname(embeddings), meta["file_list"])).read().split()
    assert len(files) == len(texts) and files == sorted(files)
    assert meta["file_list_sha256"] == sha256_lines(files)


def test_fast_tokenizer_gives_the_ids_of_clip_tokenize():
    rng = random.Random(0)
    nasty = string.printable + "é€’“”ﬁＡ\x00\x1b\x7f\x85\u00a0\u2028&<>;#'"
    texts = ["a photo of a cat", "Ünïcödé &amp; html   spaces", "word " * 200, "", "x" * 500,
             "It's a dog's life &amp;amp; I'll say: \x1b[31mred\x1b[0m", "cafÃ© â€œquotedâ€\x9d",
             "<|endoftext|> the <|startoftext|>", "a\r\nb\rc\u2028d\te", "Don'T WE'LL 12345 x;" * 10]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
              for alphabet in (string.printable, nasty) for _ in range(1500)]
    tokenizer = Tokenizer()
    tokenizer.max_cached_chunks = 100  # exercise the cache being emptied as well
    tokens, truncated = tokenizer(texts)
    assert torch.equal(tokens, clip.tokenize(texts, truncate=True))
    assert truncated == sum(len(clip.clip._tokenizer.encode(t)) > 75 for t in texts) > 2


def test_pth_txt_json_and_jsonl_inputs_give_identical_tables(image_folder, tiny_clip, embeddings, tmp_path):
    texts = torch.load(os.path.join(image_folder, "captions.pth"))
    files = open(embeddings + ".files.txt").read().split()
    (tmp_path / "c.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "c.json").write_text(json.dumps(texts))
    # path-keyed forms, shuffled: --data must put them back into ImageFolder order
    keyed = dict(reversed(list(zip(files, texts))))
    (tmp_path / "keyed.json").write_text(json.dumps(keyed))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"path": f, "description": t}) + "\n"
                                              for f, t in keyed.items()))
    reference = torch.load(embeddings)
    for name in ["c.txt", "c.json", "keyed.json", "c.jsonl"]:
        out = tmp_path / (name + ".emb.pth")
        ran([D2E, f"--caption={tmp_path / name}", f"--model={tiny_clip}", f"--output={out}",
             f"--data={image_folder}/train", "--workers=2", "--bs=5", "--quiet"])
        assert torch.equal(torch.load(out), reference), name


def _fail(args, capsys):
    import description2embedding
    from gpt4image.errors import exit_on_user_error
    with pytest.raises(SystemExit) as exc:
        exit_on_user_error(description2embedding.main, args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


@pytest.fixture
def d2e_import():
    import sys
    from conftest import REPO
    sys.path.insert(0, REPO)
    yield
    sys.path.remove(REPO)


@pytest.mark.parametrize("content, expected", [
    ("one string, not a list", "holds a str, not a list"),
    (["fine", 3, "also fine"], "#1 (int)"),
    (["fine", "   ", "also fine"], "empty, first: #1"),
    ([], "holds no descriptions"),
])
def test_bad_description_files_are_refused_and_nothing_is_written(d2e_import, tmp_path, tiny_clip, capsys,
                                                                   content, expected):
    caption = tmp_path / "c.pth"
    torch.save(content, caption)
    out = tmp_path / "out.pth"
    err = _fail([f"--caption={caption}", f"--model={tiny_clip}", f"--output={out}"], capsys)
    assert expected in err and str(caption) in err
    assert not out.exists() and not (tmp_path / "out.pth.json").exists()


def test_empty_file_unknown_model_and_missing_weights(d2e_import, tmp_path, tiny_clip, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out.pth"
    assert "is empty" in _fail([f"--caption={empty}", f"--model={tiny_clip}", f"--output={out}"], capsys)
    good = tmp_path / "c.txt"
    good.write_text("a red circle\n")
    err = _fail([f"--caption={good}", "--model=RN51", f"--output={out}"], capsys)
    assert "unknown CLIP model 'RN51'" in err and "ViT-L/14" in err
    err = _fail([f"--caption={good}", "--model=RN50", f"--download-root={tmp_path}/cache", "--no-download",
                 f"--output={out}"], capsys)
    assert f"{tmp_path}/cache/RN50.pt" in err
    assert not out.exists()


def test_existing_output_needs_force_and_unwritable_output_is_refused(d2e_import, tmp_path, tiny_clip, capsys):
    good = tmp_path / "c.txt"
    good.write_text("a red circle\na blue square\n")
    out = tmp_path / "out.pth"
    out.write_bytes(b"precious")
    err = _fail([f"--caption={good}", f"--model={tiny_clip}", f"--output={out}"], capsys)
    assert "already exists" in err and "--force" in err
    assert out.read_bytes() == b"precious"
    err = _fail([f"--caption={good}", f"--model={tiny_clip}", f"--output={tmp_path}/missing/out.pth"], capsys)
    assert "does not exist" in err
    import description2embedding
    description2embedding.main([f"--caption={good}", f"--model={tiny_clip}", f"--output={out}", "--force",
                                "--workers=0", "--quiet"])
    assert torch.load(out).shape == (2, 64)


def test_path_keyed_input_with_a_missing_image_is_an_error(d2e_import, image_folder, tiny_clip, tmp_path,
                                                          capsys, embeddings):
    files = open(embeddings + ".files.txt").read().split()
    keyed = {f: "a description" for f in files[1:]}
    keyed["red_circle/not_there.jpg"] = "a description"
    (tmp_path / "k.json").write_text(json.dumps(keyed))
    err = _fail([f"--caption={tmp_path}/k.json", f"--model={tiny_clip}", f"--output={tmp_path}/o.pth",
                 f"--data={image_folder}/train"], capsys)
    assert files[0] in err and "red_circle/not_there.jpg" in err


def test_a_bad_input_exits_non_zero_with_one_line_from_the_command_line(tmp_path, tiny_clip):
    caption = tmp_path / "c.json"
    caption.write_text(json.dumps(["ok", None]))
    proc = run_script(["description2embedding.py", f"--caption={caption}", f"--model={tiny_clip}",
                       f"--output={tmp_path}/o.pth"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "NoneType" in proc.stderr and "Traceback" not in proc.stderr
