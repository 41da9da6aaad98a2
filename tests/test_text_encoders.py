"""description2embedding.py with every encoder family, long descriptions in pieces, and the released default."""
import io
import json
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import D2E, REPO, RESNET, built_once, ran
from gpt4image._compat import import_clip
from gpt4image.text.clip_text import load_clip
from gpt4image.errors import exit_on_user_error
from gpt4image.synthetic import save_tiny_hf_text_encoder, save_tiny_open_clip
from gpt4image.text.long_text import split_description

clip = import_clip()
TEXTS = ["A red circle on a dark background.",
         "The image shows a small green square near the top left corner. It is drawn with flat colours.",
         "word " * 120,
         "Two cats sleep on a sofa. One is grey and one is white! Is that a dog in the back? Yes."]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    return built_once(tmp_path_factory, "text_encoders", lambda root: {
        "open_clip": save_tiny_open_clip(str(root / "open_clip")),
        "hf_clip": save_tiny_hf_text_encoder("clip", str(root / "hf_clip")),
        "hf_bert": save_tiny_hf_text_encoder("bert", str(root / "hf_bert"))})


@pytest.fixture
def d2e():
    sys.path.insert(0, REPO)
    import description2embedding
    yield description2embedding.main
    sys.path.remove(REPO)


def _table(d2e, tmp_path, model, texts=TEXTS, *extra, name="t.pth"):
    (tmp_path / "c.json").write_text(json.dumps(texts))
    out = tmp_path / name
    d2e([f"--caption={tmp_path}/c.json", f"--model={model}", f"--output={out}", "--workers=0", "--quiet",
         "--dtype=float32", "--bs=3", *extra])
    return torch.load(out), json.load(open(f"{out}.json"))


def test_open_clip_rows_are_its_own_encode_text_normalised(encoders, d2e, tmp_path):
    import open_clip
    table, meta = _table(d2e, tmp_path, encoders["open_clip"])
    _, config, weights = encoders["open_clip"].split(":")
    model = open_clip.create_model("tiny_open_clip", pretrained=weights).eval()
    with torch.no_grad():
        expected = F.normalize(model.encode_text(open_clip.get_tokenizer("tiny_open_clip")(TEXTS)), dim=-1)
    torch.testing.assert_close(table, expected, atol=1e-5, rtol=0)
    assert meta["family"] == "open_clip" and meta["embedding_dim"] == 48 and meta["context_length"] == 77
    assert meta["num_truncated"] == 1 and meta["versions"]["open_clip"]


def test_transformers_clip_text_rows_are_its_projected_text_embeds(encoders, d2e, tmp_path):
    from transformers import AutoTokenizer, CLIPTextModelWithProjection
    table, meta = _table(d2e, tmp_path, encoders["hf_clip"])
    directory = encoders["hf_clip"][3:]
    tok = AutoTokenizer.from_pretrained(directory)
    model = CLIPTextModelWithProjection.from_pretrained(directory).eval()
    with torch.no_grad():
        embeds = model(**tok(TEXTS, padding=True, truncation=True, max_length=77, return_tensors="pt")).text_embeds
    torch.testing.assert_close(table, F.normalize(embeds, dim=-1), atol=1e-5, rtol=0)
    assert meta["family"] == "hf" and meta["pooling"] == "clip_projection" and meta["embedding_dim"] == 40
    assert meta["num_truncated"] == sum(len(tok(t, add_special_tokens=False).input_ids) > 75 for t in TEXTS) == 3


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_transformers_bert_rows_are_its_pooled_hidden_states(encoders, d2e, tmp_path, pooling):
    from transformers import AutoModel, AutoTokenizer
    table, meta = _table(d2e, tmp_path, encoders["hf_bert"], TEXTS, f"--pooling={pooling}")
    directory = encoders["hf_bert"][3:]
    tok = AutoTokenizer.from_pretrained(directory)
    batch = tok(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(directory).eval()(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1) if pooling == "mean" else hidden[:, 0]
    torch.testing.assert_close(table, F.normalize(pooled, dim=-1), atol=1e-5, rtol=0)
    assert meta["pooling"] == pooling and meta["context_length"] == 128


def test_chunks_average_the_pieces_weighted_by_their_token_counts(tiny_clip, d2e, tmp_path):
    tokenizer = clip.clip._tokenizer
    s1 = ("The picture shows a long wooden table covered with plates, cups, bowls, bread rolls, a jug of "
          "milk and a small vase of yellow flowers standing in the middle of it.")
    s2 = ("Behind the table three people in heavy winter coats stand near a tall window and talk to each "
          "other quietly while one of them points at something outside.")
    s3 = "Outside the window it is snowing heavily and a red car is parked by the side of the road."
    count = lambda t: len(tokenizer.encode(t))  # noqa: E731
    assert count(f"{s1} {s2}") <= 75 < count(f"{s1} {s2} {s3}")  # so the pieces are [s1 s2] and [s3]
    long_text, short_text = f"{s1} {s2} {s3}", TEXTS[0]
    chunked, meta = _table(d2e, tmp_path, tiny_clip, [long_text, short_text], "--long-text=chunks")
    truncated, _ = _table(d2e, tmp_path, tiny_clip, [long_text, short_text], name="u.pth")
    model = load_clip(tiny_clip, "cpu")
    with torch.no_grad():
        pieces = F.normalize(model.encode_text(clip.tokenize([f"{s1} {s2}", s3])).float(), dim=-1)
    weights = torch.tensor([count(f"{s1} {s2}"), count(s3)], dtype=torch.float32)
    expected = F.normalize((weights[:, None] * pieces).sum(0), dim=-1)
    torch.testing.assert_close(chunked[0], expected, atol=1e-6, rtol=0)
    assert torch.equal(chunked[1], truncated[1])  # a description that fits: the same row in both modes
    assert not torch.allclose(chunked[0], truncated[0], atol=1e-3)
    assert meta["pieces_per_description"] == {"mean": 1.5, "max": 2} and meta["num_truncated"] == 0


@pytest.mark.parametrize("encoder", ["openai", "hf_bert"])
def test_no_piece_exceeds_the_context_and_every_word_is_kept_in_order(encoder, encoders):
    import random
    if encoder == "openai":  # CLIP's BPE: counts add up over spaces, the packing trusts them
        count, room, additive = (lambda t: len(clip.clip._tokenizer.encode(t))), 75, True
    else:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(encoders["hf_bert"][3:])
        count, room, additive = (lambda t: len(tok(t, add_special_tokens=False)["input_ids"])), 126, False
    rng = random.Random(0)
    words = ["cat", "window", "a", "photograph", "of", "the", "supercalifragilistic" * 6, "blue,", "dogs.", "Tree!",
             "ÜBER-straße", "x?"]
    for _ in range(30):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 200)))
        pieces = split_description(text, count, room, additive)
        assert all(count(p) <= room for p in pieces)
        assert "".join("".join(pieces).split()) == "".join(text.split())
        if count(text) <= room:
            assert pieces == [text]


def test_default_command_writes_the_released_table_byte_for_byte(tiny_clip, image_folder, tmp_path):
    out = tmp_path / "emb.pth"
    ran([D2E, f"--caption={image_folder}/captions.pth", f"--model={tiny_clip}", f"--output={out}", "--workers=2",
         "--bs=7", "--quiet"])
    texts = torch.load(os.path.join(image_folder, "captions.pth"))
    model = load_clip(tiny_clip, "cpu")
    with torch.no_grad():  # the released computation: clip.tokenize, encode_text, normalise, float16
        rows = [F.normalize(model.encode_text(clip.tokenize(texts[i:i + 7], truncate=True)).float(), dim=-1)
                for i in range(0, len(texts), 7)]
    buffer = io.BytesIO()
    torch.save(torch.cat(rows).half(), buffer)
    assert out.read_bytes() == buffer.getvalue()


def _fail(d2e, argv, capsys):
    with pytest.raises(SystemExit) as e:
        exit_on_user_error(d2e, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_unknown_family_missing_tokenizer_and_no_text_tower_are_refused(encoders, d2e, tmp_path, capsys, monkeypatch,
                                                                       caplog):
    from transformers import ViTConfig, ViTModel
    (tmp_path / "c.txt").write_text("a red circle\n")
    out = tmp_path / "out.pth"
    base = [f"--caption={tmp_path}/c.txt", f"--output={out}", "--workers=0", "--quiet"]
    err = _fail(d2e, [*base, "--model=sentence_transformers:all-MiniLM"], capsys)
    assert "'sentence_transformers'" in err and "open_clip:ARCH" in err and "hf:DIR" in err
    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(encoders["hf_bert"][3:], no_tok)
    for name in os.listdir(no_tok):
        if "token" in name:
            os.remove(no_tok / name)
    err = _fail(d2e, [*base, f"--model=hf:{no_tok}"], capsys)
    assert str(no_tok) in err and "no tokenizer" in err
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=16)).save_pretrained(tmp_path / "vit")
    capsys.readouterr()
    err = _fail(d2e, [*base, f"--model=hf:{tmp_path}/vit"], capsys)
    assert "'vit' model with no text tower" in err and "BERT" in err
    err = _fail(d2e, [*base, f"--model=hf:{tmp_path}/nowhere"], capsys)
    assert f"{tmp_path}/nowhere" in err
    err = _fail(d2e, [*base, "--model=open_clip:NoSuchArch-B-32"], capsys)
    assert "'NoSuchArch-B-32'" in err and "ViT-B-32" in err
    import socket
    lookups = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: lookups.append(a[0]) or [])
    caplog.clear()
    err = _fail(d2e, [*base, "--model=open_clip:ViT-B-32:laion2b_s34b_b79k"], capsys)
    assert "laion2b_s34b_b79k" in err and "--allow-download" in err
    assert lookups == []  # offline means no request at all (not a minute of retries before the refusal)
    assert not [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]  # the refusal is the one line
    assert not out.exists() and not os.path.exists(f"{out}.json")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["open_clip", "hf_clip", "hf_bert"])
def test_one_training_epoch_on_a_table_of_each_family(family, encoders, image_folder, tmp_path):
    table = str(tmp_path / "emb.pth")
    ran([D2E, f"--caption={image_folder}/captions.pth", f"--model={encoders[family]}", f"--output={table}",
         f"--data={image_folder}/train", "--workers=0", "--quiet", "--long-text=chunks"])
    width = json.load(open(f"{table}.json"))["embedding_dim"]
    ran([RESNET, f"--data={image_folder}", f"--text_emb={table}", "--epochs=1", f"--save_dir={tmp_path}/run",
         "-a", "resnet18", "-b", "8", "--input-size", "32", "-j", "0"], cwd=os.path.join(REPO, "resnet"))
    row = json.loads(open(f"{tmp_path}/run/log.txt").readline())
    assert row["train_text_loss"] > 0
    head = torch.load(f"{tmp_path}/run/checkpoint.pth")["projection_head"]
    assert list(head.values())[-1].shape[0] == width  # the head's output width comes from the table


def test_chunks_of_a_text_without_spaces_take_work_linear_in_its_length():
    """--long-text chunks on a 200,000-character description with no space: every count the splitter
    asks for is of a short piece, and the characters counted grow linearly (a quadratic splitter
    counts a prefix per cut: 10x the text, 100x the work; CLIP's BPE is itself quadratic in a word)."""
    import random
    from gpt4image.text.openai_clip_encoder import OpenAIClipTokenizer
    tokenizer = OpenAIClipTokenizer()
    counted = []

    def count(text):
        counted.append(len(text))
        return tokenizer.count(text)
    rng = random.Random(0)
    work = {}
    for n in (20_000, 200_000):
        counted.clear()
        text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))
        pieces = split_description(text, count, tokenizer.room, tokenizer.additive)
        assert "".join("".join(pieces).split()) == text and all(tokenizer.count(p) <= tokenizer.room for p in pieces)
        work[n] = sum(counted)
        assert max(counted) <= 1000
    assert work[200_000] <= 12 * work[20_000]


@pytest.mark.parametrize("family", ["openai_clip", "hf"])
def test_a_checkpoint_whose_vocabulary_is_smaller_than_its_tokenizer_is_one_line(family, encoders, d2e, tmp_path,
                                                                                  capsys):
    if family == "openai_clip":
        from gpt4image.synthetic import tiny_clip_state_dict
        state = tiny_clip_state_dict()
        state["token_embedding.weight"] = state["token_embedding.weight"][:300]  # ids above 299 have no row
        model = tmp_path / "small_vocab.pt"
        torch.save(state, model)
        spec = str(model)
    else:
        from transformers import BertConfig, BertModel
        folder = tmp_path / "small_vocab"
        shutil.copytree(encoders["hf_bert"][len("hf:"):], folder)
        BertModel(BertConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=128)).save_pretrained(folder)
        spec = f"hf:{folder}"
    (tmp_path / "c.json").write_text(json.dumps(["a zebra and a xylophone", "quiet evening"]))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        exit_on_user_error(d2e, [f"--caption={tmp_path}/c.json", f"--model={spec}", f"--output={tmp_path}/o.pth",
                                 "--workers=0", "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    last = err.strip().split("\n")[-1]  # after transformers' own loading bar
    assert last.startswith("error: ") and "beyond the model's vocabulary" in last, err
    assert not (tmp_path / "o.pth").exists()
