"""Does a change keep training the same? Seeded runs of both recipes from two checkouts, compared.

    python benchmarks/same_run.py run OLD_CHECKOUT /tmp/old     # data, table and three runs (CPU, ~2 min)
    python benchmarks/same_run.py run NEW_CHECKOUT /tmp/new
    python benchmarks/same_run.py compare /tmp/old /tmp/new     # prints EQUAL, or every difference

The runs: ResNet-18 and DeiT-tiny (EMA) for 3 epochs at 32 px on a generated ImageFolder with a tiny
random CLIP's table, and ResNet-18 with the sigmoid loss stopped after 2 epochs and resumed. The
comparison: every log.txt value but wall-clock ones, and every tensor of every .pth file (checkpoint,
best checkpoint, exported classifiers); keys only one side has are listed, not counted as differences.
Each checkout runs with itself first on PYTHONPATH (a checkout from before the package moved into
subpackages works too). Used for issue 25: the refactor left every value and tensor equal.
"""
import json
import os
import subprocess
import sys


def run(repo, out):
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=repo)
    py = sys.executable
    data = os.path.join(out, "data")
    if not os.path.isdir(data):
        subprocess.run([py, "-c", (
            "import gpt4image, torch, os, sys\n"
            "from gpt4image.synthetic import make_image_folder, describe_image_folder, save_tiny_clip\n"
            "root = sys.argv[1]\n"
            "make_image_folder(root, num_classes=4, train_per_class=12, val_per_class=4, size=32)\n"
            "texts, files = describe_image_folder(os.path.join(root, 'train'))\n"
            "torch.save(texts, os.path.join(root, 'captions.pth'))\n"
            "save_tiny_clip(os.path.join(root, 'tiny_clip.pt'))\n"), data], check=True, env=env)
        subprocess.run([py, "description2embedding.py", f"--caption={data}/captions.pth",
                        f"--model={data}/tiny_clip.pt", f"--output={data}/emb.pth", f"--data={data}/train",
                        "--workers=0", "--quiet"], cwd=repo, check=True, env=env)
    runs = {
        "resnet": ["resnet/main.py", f"--data={data}", f"--text_emb={data}/emb.pth", "--epochs=3", "-j", "1",
                   "-a", "resnet18", "-b", "8", "--input-size", "32", "-p", "2", "--seed", "0",
                   f"--save_dir={out}/resnet"],
        "deit": ["deit/main.py", f"--data-path={data}", f"--text_emb={data}/emb.pth", "--epochs=3", "--num_workers=1",
                 "--model", "deit_tiny_patch16_224", "--input-size", "32", "--batch-size", "8", "-p", "2",
                 "--seed", "0", "--warmup-epochs", "1", f"--output_dir={out}/deit"],
        "resnet_stop": ["resnet/main.py", f"--data={data}", f"--text_emb={data}/emb.pth", "--epochs=3", "-j", "1",
                        "-a", "resnet18", "-b", "8", "--input-size", "32", "-p", "2", "--seed", "0",
                        "--loss_type", "sigmoid", "--stop-after", "2", f"--save_dir={out}/resnet_stop"],
    }
    for name, cmd in runs.items():
        for _ in range(2 if name.endswith("_stop") else 1):  # stop after 2, then resume to the end
            proc = subprocess.run([py] + cmd, cwd=repo, env=env, capture_output=True, text=True)
            if proc.returncode not in (0, 75):
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        print(f"{name}: {out}/{name}")
    print(f"runs in {out}; compare two such folders with: python benchmarks/same_run.py compare OLD NEW")


TIMING = {"images_per_s", "epoch_time_s", "train_images_per_s", "train_epoch_time_s"}


def rows(folder):
    return [json.loads(line) for line in open(os.path.join(folder, "log.txt"))]


def tensors(obj, prefix=""):
    import torch
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}[{i}]")


def compare(a, b):
    import torch
    bad = 0
    for name in sorted(os.listdir(a)):
        fa, fb = os.path.join(a, name), os.path.join(b, name)
        if name == "data" or not os.path.isdir(fa):
            continue
        ra, rb = rows(fa), rows(fb)
        for i, (x, y) in enumerate(zip(ra, rb)):
            for k in sorted(set(x) & set(y)):
                if k in TIMING or "time" in k or "per_s" in k:
                    continue
                if x[k] != y[k]:
                    bad += 1
                    print(f"{name} log row {i} {k}: {x[k]} != {y[k]}")
        if len(ra) != len(rb):
            bad += 1
            print(f"{name}: {len(ra)} vs {len(rb)} log rows")
        only = sorted(set(ra[-1]) ^ set(rb[-1])) if ra and rb else []
        print(f"{name}: {len(ra)} log rows compared; keys only in one: {only}")
        for f in sorted(os.listdir(fa)):
            if not f.endswith((".pth", ".tar")):
                continue
            if not os.path.exists(os.path.join(fb, f)):
                print(f"{name}/{f}: missing in {b}")
                bad += 1
                continue
            sa = torch.load(os.path.join(fa, f), map_location="cpu", weights_only=True)
            sb = torch.load(os.path.join(fb, f), map_location="cpu", weights_only=True)
            ta, tb = dict(tensors(sa)), dict(tensors(sb))
            common = sorted(set(ta) & set(tb))
            diff = [k for k in common if not torch.equal(ta[k], tb[k])]
            print(f"{name}/{f}: {len(common)} tensors compared, {len(diff)} differ"
                  + (f" ({diff[:5]})" if diff else "") + (f"; only in one: {sorted(set(ta) ^ set(tb))[:6]}"
                                                          if set(ta) ^ set(tb) else ""))
            bad += len(diff)
    print("EQUAL" if not bad else f"{bad} DIFFERENCES")
    return bad


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("run", "compare"):
        sys.exit(__doc__)
    if sys.argv[1] == "run":
        run(os.path.abspath(sys.argv[2]), os.path.abspath(sys.argv[3]))
    else:
        sys.exit(1 if compare(sys.argv[2], sys.argv[3]) else 0)
