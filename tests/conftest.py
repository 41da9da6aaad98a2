"""Shared fixtures and helpers. TMPDIR and the inductor cache go under pytest's base folder (a passing run
deletes it); ``ran``/``refused`` run an entry point's ``main(argv)`` in this process, ``run_script`` in a
fresh interpreter (where the process is what is tested); each test leaves the logger, RNG states, thread
count, process group and working folder as it found them; shared reference runs are built once."""
import contextlib
import io
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

# One compute thread per process, for this process and every process it starts: pytest-xdist's workers
# and the runs they start share the cores, and torch's default of one thread per core in each of them
# oversubscribes the machine (OpenMP's spin-waiting then burns several times the CPU of the work: a
# resnet18 step on 2 busy cores took 6x the CPU time with 2 threads than with 1). Inductor compiles in
# this process too, not in a pool of compile workers that would each import torch.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import gpt4image  # noqa: F401,E402
from gpt4image.synthetic import describe_image_folder, make_image_folder, save_tiny_clip  # noqa: E402

torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESNET = os.path.join(REPO, "resnet", "main.py")
DEIT = os.path.join(REPO, "deit", "main.py")
D2E = os.path.join(REPO, "description2embedding.py")
GENERATE = os.path.join(REPO, "generate_descriptions.py")
# the smallest ResNet run most tests train: resnet18 at 32 px, batches of 4, no loader workers, seeded
SMALL = ["-a", "resnet18", "-b", "4", "--input-size", "32", "-j", "0", "--seed", "0"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_under_pytest(tmp_path_factory):
    """TMPDIR (this process and every child: torchrun's torchelastic_*, multiprocessing's pymp-*) and
    the inductor cache go under pytest's base folder, which a passing run removes."""
    tmp = tmp_path_factory.getbasetemp() / "tmp"
    tmp.mkdir(exist_ok=True)
    saved = {k: os.environ.get(k) for k in ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR")}
    saved_tempdir = tempfile.tempdir
    os.environ["TMPDIR"] = str(tmp)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "torchinductor")
    ENV.update(TMPDIR=str(tmp), TORCHINDUCTOR_CACHE_DIR=str(tmp / "torchinductor"))
    tempfile.tempdir = str(tmp)
    yield tmp
    tempfile.tempdir = saved_tempdir
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextlib.contextmanager
def process_state_restored():
    """Put back what an entry point run in this process changes: the package logger's handlers (the new
    ones closed), the RNG states, torch's thread count, the process group, the working folder."""
    import logging

    import torch.distributed as dist
    logger = logging.getLogger("gpt4image")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    threads, cwd = torch.get_num_threads(), os.getcwd()
    try:
        yield
    finally:
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.chdir(cwd)


@pytest.fixture(autouse=True)
def _restore_process_state():
    with process_state_restored():
        yield


def entry_point(script):
    """``main(argv)`` of one of our scripts: resnet/main.py, deit/main.py, a top-level ``<tool>.py`` of
    the repository, or ``-m <module>``."""
    import importlib
    if script == RESNET:
        return importlib.import_module("gpt4image.recipes.resnet").main
    if script == DEIT:
        return importlib.import_module("gpt4image.recipes.deit").main
    if script.startswith("-m "):
        module = importlib.import_module(script[3:])
        if hasattr(module, "__path__"):  # a package: `python -m` runs its __main__
            module = importlib.import_module(f"{script[3:]}.__main__")
        return module.main
    return tool_main(os.path.splitext(os.path.basename(script))[0])


def _split(cmd):
    if cmd[0] == "-m":
        return entry_point(f"-m {cmd[1]}"), list(cmd[2:])
    return entry_point(cmd[0]), list(cmd[1:])


def ran(cmd, cwd=REPO):
    """Run ``cmd`` (a script of ours and its arguments, or ``-m module ...``) in this process, as its
    command line would, and return its output as ``.stdout`` / ``.stderr`` and what ``main`` returned as
    ``.result`` (a failure raises, as a bug should)."""
    main, argv = _split(cmd)
    err, out = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            result = main(argv)
    finally:
        os.chdir(here)
    return SimpleNamespace(stdout=out.getvalue(), stderr=err.getvalue(), result=result)


def refused(cmd, *expected, cwd=REPO):
    """Run ``cmd`` (as ``ran``) the way its command line would (exit_on_user_error); assert exit code 2,
    one line on stderr starting with 'error:', no traceback (any other exception propagates and fails the
    test), and every ``expected`` text in it. Returns the line."""
    from gpt4image.errors import exit_on_user_error
    main, argv = _split(cmd)
    err, out = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
            exit_on_user_error(main, argv)
    finally:
        os.chdir(here)
    line = err.getvalue().strip()
    assert e.value.code == 2, (e.value.code, out.getvalue()[-2000:], line[-2000:])
    assert len(line.splitlines()) == 1 and line.startswith("error: "), line
    for text in expected:
        assert text in line, (text, line)
    return line


def tool_main(tool):
    """``main`` of the repository's script ``<tool>.py`` (description2embedding, generate_descriptions, ...)."""
    sys.path.insert(0, REPO)
    try:
        import importlib
        return importlib.import_module(tool).main
    finally:
        sys.path.remove(REPO)


def run_script(args, cwd=None, timeout=300, env=None, check=True):
    """Run a python entry point of the repo in a fresh interpreter; return CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    full_env.update(env or {})
    proc = subprocess.run([sys.executable] + list(args), cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def torchrun(*args, nproc=2):
    """The command line of ``torchrun --standalone --nproc_per_node=<nproc> <args>``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def kill_once_written(cmd, part, lines, env=None, timeout=300):
    """Start ``cmd``, SIGKILL it as soon as the file ``part`` holds ``lines`` lines; return how many it holds."""
    import signal
    import time
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and not (os.path.exists(part) and open(part, "rb").read().count(b"\n") >= lines):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return open(part, "rb").read().count(b"\n")


def children(pid):
    """PIDs of the processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def snapshot(folder):
    """Every file below ``folder`` with its bytes (None when the folder does not exist)."""
    if not os.path.exists(folder):
        return None
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


def described_paths(output):
    """Image paths of every record in generate_descriptions' part files for ``output``, repeats kept."""
    import json
    parts = f"{output}.parts"
    return [json.loads(line)["path"] for name in sorted(os.listdir(parts)) if name.endswith(".jsonl")
            for line in open(os.path.join(parts, name), encoding="utf-8")]


@pytest.fixture
def compile_without_codegen(monkeypatch):
    """``torch.compile`` with the ``aot_eager`` backend for one test. What the compile tests check is
    our code around the compiled model (state-dict keys, exported weights, resume, per-step seeds under
    graph capture, the alignment state inside the graph): dynamo and AOT autograd trace and run the same
    graphs under any backend. Inductor's C++ code generation on CPU took minutes per test and is
    PyTorch's to test (on GPU the recipes' --compile uses inductor)."""
    import functools
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    yield
    torch._dynamo.reset()


def built_once(tmp_path_factory, name, build):
    """What ``build(folder)`` returns (paths, as JSON), built into ``folder`` once per test session
    however many pytest-xdist workers ask: the first builds under a file lock, the others wait and read
    it (a session fixture alone is built once per worker)."""
    import json

    from filelock import FileLock
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the base folder all workers share
    folder = root / "built_once" / name
    folder.parent.mkdir(exist_ok=True)
    done = folder.parent / f"{name}.json"
    with FileLock(str(folder.parent / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            with process_state_restored():
                made = build(folder)
            done.write_text(json.dumps(made))
        return json.loads(done.read_text())


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return built_once(tmp_path_factory, "clip", lambda folder: save_tiny_clip(str(folder / "tiny_clip.pt")))


@pytest.fixture(scope="session")
def vlm(tmp_path_factory):
    """family -> directory of its tiny random model (built once per session)."""
    from gpt4image.describe.tiny_vlm import FAMILIES, save_tiny_vlm
    return built_once(tmp_path_factory, "vlm",
                      lambda root: {family: save_tiny_vlm(family, str(root / family)) for family in FAMILIES})


def _image_folder(root):
    make_image_folder(str(root), num_classes=4, train_per_class=12, val_per_class=4, size=32)
    texts, files = describe_image_folder(os.path.join(root, "train"))
    torch.save(texts, os.path.join(root, "captions.pth"))
    return str(root)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Generated ImageFolder (4 classes, 12 train + 4 val images each, 32 px) and its descriptions."""
    return built_once(tmp_path_factory, "images", _image_folder)


@pytest.fixture(scope="session")
def embeddings(image_folder, tiny_clip, tmp_path_factory):
    """Embedding table of the generated ImageFolder, made by description2embedding.py (in this process)."""
    def build(folder):
        out = str(folder / "emb.pth")
        ran([D2E, f"--caption={image_folder}/captions.pth", f"--model={tiny_clip}", f"--output={out}",
             f"--data={image_folder}/train", "--workers=0", "--quiet"])
        return out
    return built_once(tmp_path_factory, "emb", build)


def _photos(folder):
    root = folder / "train"
    generator = torch.Generator().manual_seed(0)
    for i in range(13):
        sub = root / ["n01440764", "n01443537", "n01484850"][i % 3]
        sub.mkdir(parents=True, exist_ok=True)
        w, h = 24 + 9 * (i % 4), 28 + 5 * (i % 3)
        pixels = torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(sub / f"img_{i:02d}.jpg", quality=90)
    return str(root)


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """An ImageFolder of 13 images of different sizes in 3 classes (so batches need padding)."""
    return built_once(tmp_path_factory, "photos", _photos)


@pytest.fixture(scope="session")
def first_of_two_epochs(image_folder, embeddings, tmp_path_factory):
    """(Built once) an output folder holding one finished epoch of a 2-epoch resnet18 run (SMALL)."""
    def build(folder):
        ran([RESNET, f"--data={image_folder}", f"--text_emb={embeddings}", "--epochs=2", *SMALL,
             f"--save_dir={folder / 'run'}", "--stop-after=1"])
        return str(folder / "run")
    return Path(built_once(tmp_path_factory, "first_of_two_epochs", build))


def copy_run(run, to):
    """A copy of the run folder ``run`` at ``to`` (for a test that changes it); returns ``to``."""
    return shutil.copytree(run, to)


@pytest.fixture(scope="session")
def two_rank_run(image_folder, embeddings, tmp_path_factory):
    """(Built once) an uninterrupted 2-epoch, 2-process torchrun of resnet18 (batches of 4, one loader
    worker): what the interrupted, killed and restarted runs must equal."""
    def build(run):
        proc = subprocess.run(torchrun(RESNET, f"--data={image_folder}", f"--text_emb={embeddings}", "--epochs=2",
                                       "-a", "resnet18", "-b", "4", "--input-size", "32", "-j", "1", "--seed", "0",
                                       "-p", "1", f"--save_dir={run}"),
                              capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return str(run)
    return Path(built_once(tmp_path_factory, "two_rank_run", build))


def own_generate(model_dir, image_path, prompt, max_new_tokens):
    """What the model's own processor and generate give for one image, with nothing of ours."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    if processor.chat_template:
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
            add_generation_prompt=True)
    else:
        text = prompt
    inputs = processor(text=[text], images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def pytest_collection_modifyitems(config, items):
    """The slow tests first (in their files' order): under ``-n 3`` the workers take tests one by one
    (pyproject: --maxschedchunk=1), so the long ones are spread over the workers from the start and the run does
    not end on one worker with a long test still to go."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
