"""The description tools at ImageNet's size: merging 1,281,167 records, and reading them back in order.

    python benchmarks/descriptions_1m.py --root /scratch/d1m [--images 1281167] [--shards 16] [--keep]

Writes under ``--root`` (deleted afterwards unless ``--keep``): an ImageFolder of empty files
(1,000 class folders) and ``generate_descriptions.py``'s part files for it, in ``--shards`` shards,
records as the tool writes them (MiniGPT-4-length descriptions of 60-120 words; 1 % flagged by the
quality gate). Then, each in a fresh process, times and takes the peak resident memory of:
- ``list``: listing the ImageFolder (part of both steps below);
- ``merge``: ``generate_descriptions.py --merge`` (listing, index of the part files, the quality
  gate on every record, writing the final file in order, the metadata);
- ``read``: description2embedding.py before encoding: reading the JSONL, putting it into the
  folder's order, the file-list checks and hash.
Memory is the process's peak RSS (``ru_maxrss``), with the interpreter, torch and our package
imported (``baseline``) included.
"""
import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time

from common import RESULTS, print_table, write_json

WORDS = ("a an the photo image dog cat bird car tree house street man woman child grass sky water table chair "
         "red green blue white black small large old young sitting standing running next to in on under near "
         "with its their background foreground left right center light shadow wooden metal bright dark several "
         "field road building window door flower leaf river mountain beach sand snow cloud sun").split()


def make(root, images, shards, per_class=1282):
    from gpt4image.describe.parts import Parts
    train = os.path.join(root, "train")
    classes = (images + per_class - 1) // per_class
    rng = random.Random(0)
    pool = [" ".join(rng.choices(WORDS, k=rng.randint(60, 120))).capitalize() for _ in range(4096)]
    parts = Parts(os.path.join(root, "descriptions.jsonl"))
    os.makedirs(parts.directory, exist_ok=True)
    outs = [open(parts.part_path(s, shards), "w", encoding="utf-8") for s in range(shards)]
    index = 0
    for c in range(classes):
        folder = f"n{c:08d}"
        os.makedirs(os.path.join(train, folder), exist_ok=True)
        for j in range(min(per_class, images - index)):
            name = f"{folder}_{j:05d}.JPEG"
            open(os.path.join(train, folder, name), "wb").close()
            # distinct texts of MiniGPT-4's length: a pool sentence and the image's own number
            text = f"{pool[index % len(pool)]} number {index}."
            record = {"path": f"{folder}/{name}", "description": text, "class": folder}
            if rng.random() < 0.01:
                record["description"] = record["description"][:-1]
                record.update(hit_max_new_tokens=True, flags=["cut"])
            outs[index % shards].write(json.dumps(record) + "\n")
            index += 1
    for f in outs:
        f.close()
    with open(parts.settings_path, "w") as f:
        json.dump({"model": "synthetic"}, f)
    return train, parts.output


def phase(name, root):
    """Run one step in this process; print a JSON line with its seconds and peak memory."""
    import gpt4image  # noqa: F401
    from gpt4image.describe.listing import list_image_folder, list_images
    from gpt4image.describe.parts import Parts
    from gpt4image.text.descriptions import read_description_set
    from gpt4image.io import sha256_lines
    from gpt4image.describe.quality import QualityGate
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    train, output = os.path.join(root, "train"), os.path.join(root, "descriptions.jsonl")
    start, cpu = time.perf_counter(), time.process_time()
    if name == "list":
        n = len(list_image_folder(train))
    elif name == "merge":
        items = list_images(train)
        counts, _, tally = Parts(output).merge(items, {"tool": "benchmark"}, gate=QualityGate())
        n = counts["described"]
        assert n == len(items) and tally.counts["cut"] > 0
    else:
        found = read_description_set(output, train)
        sha256_lines(found.files)
        n = len(found.texts)
    print(json.dumps({"phase": name, "records": n, "seconds": time.perf_counter() - start,
                      "cpu_seconds": time.process_time() - cpu, "baseline_mib": baseline,
                      "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="scratch folder for the generated files (~1 GB for 1.28M)")
    p.add_argument("--images", type=int, default=1_281_167)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--phase", choices=["list", "merge", "read"], help=argparse.SUPPRESS)
    p.add_argument("--json", default=os.path.join(RESULTS, "descriptions_1m.json"))
    args = p.parse_args()
    if args.phase:
        return phase(args.phase, args.root)
    if os.path.exists(args.root) and os.listdir(args.root):
        raise SystemExit(f"--root {args.root} is not empty; pass a new folder")
    start = time.perf_counter()
    make(args.root, args.images, args.shards)
    print(f"made {args.images} images' part files in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    try:
        for name in ("list", "merge", "read"):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--root", args.root, "--phase", name],
                                 capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
        size = os.path.getsize(os.path.join(args.root, "descriptions.jsonl"))
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)
    print(f"\n{args.images} images in {args.shards} shards; final file {size / 2 ** 20:.0f} MiB")
    print_table(rows, ["phase", "records", "seconds", "cpu_seconds", "baseline_mib", "peak_mib"])
    write_json(args.json, {"images": args.images, "shards": args.shards, "final_file_bytes": size, "rows": rows})


if __name__ == "__main__":
    main()
