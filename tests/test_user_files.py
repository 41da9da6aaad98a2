"""Every reader of a file a user gives (description files of each format, class-names files, image
lists) answers any content with a result or one UserError line (exit 2 at the entry point), never a
traceback or a hang; and the cases a new user met: a null description, one image spelled several
ways, line separators inside a description, a dataset root passed as the train folder."""
import json
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO
from gpt4image.describe.listing import list_images, read_class_names
from gpt4image.text.descriptions import read_descriptions
from gpt4image.errors import UserError, exit_on_user_error, one_line

# bounded work per example: CPU is shared, and a hang shows as a deadline failure
FAST = settings(max_examples=60, deadline=2000, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=12)
contents = st.one_of(st.binary(max_size=300), st.text(max_size=300).map(lambda t: t.encode("utf-8")),
                     json_values.map(lambda v: json.dumps(v).encode("utf-8")),
                     st.lists(json_values, max_size=6).map(lambda vs: "\n".join(map(json.dumps, vs)).encode("utf-8")))


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    """A train folder of two classes, two (empty) images each: readers only list it."""
    root = tmp_path_factory.mktemp("data") / "train"
    for name in ("a/1.jpg", "a/2.jpg", "b/1.jpg", "b/2.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    return str(root)


def _answers(read):
    """``read()`` returns, or raises a UserError of one line; anything else fails the test."""
    try:
        return read()
    except UserError as e:
        assert one_line(e), "an empty message"  # the entry point prints it on one line (checked below)
        return e


@pytest.mark.parametrize("suffix", [".txt", ".json", ".jsonl", ".pth"])
@pytest.mark.parametrize("with_folder", [False, True])
@FAST
@given(data=contents)
def test_any_description_file_gives_descriptions_or_one_user_error(suffix, with_folder, data, train, tmp_path):
    path = tmp_path / f"d{suffix}"
    path.write_bytes(data)
    _answers(lambda: read_descriptions(str(path), train if with_folder else None))


@FAST
@given(value=st.one_of(st.lists(st.text(max_size=30), max_size=5), st.dictionaries(st.text(max_size=10),
                                                                                    st.text(max_size=30), max_size=5)))
def test_any_pth_of_strings_gives_descriptions_or_one_user_error(value, train, tmp_path):
    path = tmp_path / "d.pth"
    torch.save(value, path)
    for folder in (None, train):
        _answers(lambda folder=folder: read_descriptions(str(path), folder))


@pytest.mark.parametrize("suffix", [".json", ".txt"])
@FAST
@given(data=contents)
def test_any_class_names_file_gives_names_or_one_user_error(suffix, data, tmp_path):
    path = tmp_path / f"LOC_synset_mapping{suffix}"
    path.write_bytes(data)
    _answers(lambda: read_class_names(str(path), {"n01440764"}))


@FAST
@given(data=st.one_of(st.binary(max_size=300), st.lists(st.sampled_from(["a.jpg", "./a.jpg", "//x/a.jpg", "a/./b.jpg",
                                                                          "../c.jpg", "\u2028", " ", "\x00", "é"]),
                                                         max_size=6).map(lambda p: "\n".join(p).encode())))
def test_any_image_list_gives_images_or_one_user_error(data, tmp_path):
    path = tmp_path / "images.txt"
    path.write_bytes(data)
    found = _answers(lambda: list_images(str(path)))
    if not isinstance(found, UserError):  # one entry per image, however it is spelled
        from gpt4image.describe.listing import canonical_path
        keys = [canonical_path(i.path, str(tmp_path)) for i in found]
        assert len(set(keys)) == len(keys)


def _d2e_main():
    sys.path.insert(0, REPO)
    try:
        import description2embedding
        return description2embedding.main
    finally:
        sys.path.remove(REPO)


def _gd_main():
    sys.path.insert(0, REPO)
    try:
        import generate_descriptions
        return generate_descriptions.main
    finally:
        sys.path.remove(REPO)


def _refused(main, argv, capsys):
    """The entry point's top-level handler turns the UserError into one line and exit code 2."""
    with pytest.raises(SystemExit) as e:
        exit_on_user_error(main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_reader_error_reaches_the_user_as_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "d.jsonl"
    bad.write_bytes(b'{"description": "a"}\n[1, 2\n')
    err = _refused(_d2e_main(), [f"--caption={bad}", "--model=RN50", "--no-download", f"--output={tmp_path}/o.pth"],
                   capsys)
    assert f"{bad}:2" in err
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xff\xfe")
    err = _refused(_gd_main(), [f"--data={listing}", f"--model={tmp_path}", f"--output={tmp_path}/d.jsonl"], capsys)
    assert str(listing) in err


def test_a_null_description_is_named_as_null_not_as_a_missing_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"path": "a/1.jpg", "description": "fine"}\n{"path": "a/2.jpg", "description": null}\n')
    with pytest.raises(UserError, match=r'd.jsonl:2: "description" is null'):
        read_descriptions(str(path))


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("spelling", ["./a/1.jpg", "a//1.jpg", "a/./1.jpg", "{train}/a/1.jpg", "/{train}/a/1.jpg"])
def test_one_image_spelled_two_ways_in_a_description_file_is_one_image(suffix, spelling, train, tmp_path):
    spelling = spelling.format(train=train)
    keyed = {"a/1.jpg": "one", "a/2.jpg": "two", "b/1.jpg": "three", "b/2.jpg": "four"}
    path = tmp_path / f"d{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(dict(keyed, **{spelling: "again"})))
    else:
        path.write_text("".join(json.dumps({"path": k, "description": v}) + "\n"
                                for k, v in [*keyed.items(), (spelling, "again")]))
    with pytest.raises(UserError, match="name the same image"):
        read_descriptions(str(path), train)
    del keyed["a/1.jpg"]
    keyed[spelling] = "one"  # the other spelling alone is that image
    path.write_text(json.dumps(keyed) if suffix == ".json" else
                    "".join(json.dumps({"path": k, "description": v}) + "\n" for k, v in keyed.items()))
    texts, files = read_descriptions(str(path), train)
    assert files == ["a/1.jpg", "a/2.jpg", "b/1.jpg", "b/2.jpg"] and texts == ["one", "two", "three", "four"]


@pytest.mark.parametrize("spelling", ["./a.jpg", "//{dir}/a.jpg", "sub/../a.jpg", "{dir}/a.jpg", "./sub/./../a.jpg"])
def test_one_image_spelled_two_ways_in_an_image_list_is_refused_once_named(spelling, tmp_path, capsys):
    listing = tmp_path / "images.txt"
    listing.write_text(f"a.jpg\nb.jpg\n{spelling.format(dir=tmp_path)}\n")
    err = _refused(_gd_main(), [f"--data={listing}", f"--model={tmp_path}", f"--output={tmp_path}/d.jsonl"], capsys)
    assert "'a.jpg'" in err and "more than once" in err


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\r"])
def test_a_txt_description_file_ends_lines_only_at_newlines(separator, tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(f"a dog{separator}on grass\r\na cat\n".encode())
    texts, _ = read_descriptions(str(path))
    assert texts == [f"a dog{separator}on grass", "a cat"]


@pytest.mark.parametrize("tool", ["generate_descriptions", "description2embedding"])
def test_a_dataset_root_as_the_train_folder_is_refused_with_the_fix(tool, train, tmp_path, capsys):
    root = os.path.dirname(train)
    os.makedirs(os.path.join(root, "val", "a"), exist_ok=True)
    if tool == "generate_descriptions":
        argv = [f"--data={root}", f"--model={tmp_path}", f"--output={tmp_path}/d.jsonl"]
        main = _gd_main()
    else:
        captions = tmp_path / "d.json"
        captions.write_text(json.dumps({"train/a/1.jpg": "x", "train/a/2.jpg": "y"}))
        argv = [f"--caption={captions}", f"--data={root}", "--model=RN50", "--no-download",
                f"--output={tmp_path}/o.pth"]
        main = _d2e_main()
    err = _refused(main, argv, capsys)
    assert "dataset root" in err and repr(train) in err
    assert os.listdir(tmp_path) == ([] if tool == "generate_descriptions" else ["d.json"])
