"""Resident memory of the shared embedding table across ranks and DataLoader workers.

    python benchmarks/embedding_memory.py [--rows 1281167 --dim 1024 --ranks 2 --workers 2] [--released]

Writes a synthetic fp16 table, starts ``--ranks`` processes that each load it with
``load_text_embeddings`` (memory-mapped) and read every row through a DataLoader with ``--workers``
workers, then sums the proportional set size (PSS: shared pages counted once across processes) of
all of them. ``--released`` measures the released code's way instead: each rank loads the table
and converts it to one fp32 copy in its own memory. Prints a table and writes JSON.
"""
import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gpt4image  # noqa: E402,F401  (first: makes torchvision importable)
from gpt4image.text.tables import WithTextEmbeddings, load_text_embeddings  # noqa: E402


class _Index(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i, 0


def _pss_kib(pid, field="Pss"):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _rank(path, released, workers, ready, done):
    if released:
        table = torch.load(path, map_location="cpu").float()  # one private fp32 copy per rank
        table.sum()
    else:
        emb = load_text_embeddings(path)  # validation reads every page once
        data = WithTextEmbeddings(_Index(len(emb)), emb, check_files=False)
        loader = torch.utils.data.DataLoader(data, batch_size=8192, num_workers=workers, persistent_workers=workers > 0,
                                             sampler=range(0, len(emb), 1))
        for _ in loader:  # the workers touch every row
            pass
    ready.set()
    done.wait()


def _measure(rows, dim, args):
    """(table file MiB, node PSS MiB, number of processes, seconds) for one run of the process tree."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "table.pth")
        table = torch.cat([torch.nn.functional.normalize(torch.randn(min(100000, rows - s), dim), dim=1).half()
                           for s in range(0, rows, 100000)])
        torch.save(table, path)
        del table
        size_mib = os.path.getsize(path) / 2 ** 20
        ctx = mp.get_context("spawn")  # fork after torch threads ran can deadlock
        ready = [ctx.Event() for _ in range(args.ranks)]
        done = ctx.Event()
        t0 = time.time()
        procs = [ctx.Process(target=_rank, args=(path, args.released, args.workers, ready[r], done))
                 for r in range(args.ranks)]
        for pr in procs:
            pr.start()
        for e in ready:
            e.wait()
        tree = []
        for pr in procs:
            tree += [pr.pid] + _children(pr.pid)
        pss_mib = sum(_pss_kib(pid) for pid in tree) / 1024
        seconds = time.time() - t0
        done.set()
        for pr in procs:
            pr.join()
    return size_mib, pss_mib, len(tree), seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1281167)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--released", action="store_true")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "embedding_memory.json"))
    args = p.parse_args(argv)
    size_mib, pss_mib, processes, seconds = _measure(args.rows, args.dim, args)
    _, base_mib, _, _ = _measure(1, args.dim, args)  # same processes, a 1-row table: Python + torch
    table_mib = pss_mib - base_mib
    result = {"mode": "released (fp32 copy per rank)" if args.released else "memory-mapped fp16 (ours)",
              "rows": args.rows, "dim": args.dim, "ranks": args.ranks, "workers_per_rank": args.workers,
              "processes": processes, "table_file_mib": round(size_mib, 1), "node_pss_mib": round(pss_mib, 1),
              "node_pss_without_table_mib": round(base_mib, 1), "table_memory_mib": round(table_mib, 1),
              "ratio_to_table": round(table_mib / size_mib, 3), "seconds": round(seconds, 1)}
    print("| mode | ranks x workers | processes | table file (MiB) | node PSS (MiB) | of which the table (MiB) "
          "| table memory / file |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {result['mode']} | {args.ranks} x {args.workers} | {processes} | {size_mib:.0f} | {pss_mib:.0f} | "
          f"{table_mib:.0f} | {table_mib / size_mib:.2f} |")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    json.dump(result, open(args.json, "w"), indent=2)
    print(f"results: {os.path.abspath(args.json)}")


if __name__ == "__main__":
    main()
