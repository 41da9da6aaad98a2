import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import gpt4image  # noqa: F401
from gpt4image.synthetic import describe_image_folder, make_image_folder, save_tiny_clip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def described_paths(output):
    """Image paths of every record in generate_descriptions' part files for ``output``, repeats kept."""
    import json
    parts = f"{output}.parts"
    return [json.loads(line)["path"] for name in sorted(os.listdir(parts)) if name.endswith(".jsonl")
            for line in open(os.path.join(parts, name), encoding="utf-8")]


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(str(tmp_path_factory.mktemp("clip") / "tiny_clip.pt"))


@pytest.fixture(scope="session")
def vlm(tmp_path_factory):
    """family -> directory of its tiny random model (built once per session)."""
    from gpt4image.describe.tiny_vlm import FAMILIES, save_tiny_vlm
    root = tmp_path_factory.mktemp("vlm")
    return {family: save_tiny_vlm(family, str(root / family)) for family in FAMILIES}


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Generated ImageFolder (4 classes, 12 train + 4 val images each, 32 px) and its descriptions."""
    root = str(tmp_path_factory.mktemp("images"))
    make_image_folder(root, num_classes=4, train_per_class=12, val_per_class=4, size=32)
    texts, files = describe_image_folder(os.path.join(root, "train"))
    torch.save(texts, os.path.join(root, "captions.pth"))
    return root


@pytest.fixture(scope="session")
def embeddings(image_folder, tiny_clip, tmp_path_factory):
    """Embedding table of the generated ImageFolder, made by description2embedding.py."""
    out = str(tmp_path_factory.mktemp("emb") / "emb.pth")
    run_script(["description2embedding.py", f"--caption={image_folder}/captions.pth", f"--model={tiny_clip}",
                f"--output={out}", f"--data={image_folder}/train", "--workers=0", "--quiet"])
    return out


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """An ImageFolder of 13 images of different sizes in 3 classes (so batches need padding)."""
    root = tmp_path_factory.mktemp("photos") / "train"
    generator = torch.Generator().manual_seed(0)
    for i in range(13):
        folder = root / ["n01440764", "n01443537", "n01484850"][i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        w, h = 24 + 9 * (i % 4), 28 + 5 * (i % 3)
        pixels = torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img_{i:02d}.jpg", quality=90)
    return str(root)


def tool_main(tool):
    """``main`` of the repository's script ``<tool>.py`` (description2embedding, generate_descriptions, ...)."""
    sys.path.insert(0, REPO)
    try:
        import importlib
        return importlib.import_module(tool).main
    finally:
        sys.path.remove(REPO)
