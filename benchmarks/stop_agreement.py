"""Per-step cost of agreeing on a stop request across ranks: none, blocking, and ours (asynchronous).

    python benchmarks/stop_agreement.py [--ranks 2] [--step-ms 20] [--steps 300]

Starts itself under torchrun (gloo, CPU). Each simulated step is --step-ms of work in a background
thread (as a GPU computes while the host waits); after each step every rank asks whether to stop:
"none" does not ask, "blocking" all-reduces its flag and waits (what a plain implementation does),
"ours" is gpt4image's RunControl (starts the exchange, reads the previous step's). Reports the
time per step and the overhead against "none".
"""
import argparse
import os
import subprocess
import sys
import time

from common import RESULTS, print_table, write_json


def worker(args):
    import torch
    import torch.distributed as dist
    from gpt4image.train.resumable import RunControl
    dist.init_process_group("gloo")
    group = dist.new_group(backend="gloo")

    def step():  # host-side wait for work done elsewhere (sleep releases the GIL, like a CUDA sync)
        time.sleep(args.step_ms / 1000)

    def blocking():
        flag = torch.zeros(1, dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    stop = RunControl(group)
    modes = {"none": lambda: False, "blocking": blocking, "ours": stop}
    rows = []
    for name, ask in modes.items():
        dist.barrier(group)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
            ask()
        elapsed = (time.perf_counter() - start) / args.steps * 1000
        rows.append({"mode": name, "step ms": elapsed})
    stop.restore()
    if dist.get_rank() == 0:
        for row in rows:
            row["overhead ms"] = row["step ms"] - rows[0]["step ms"]
        print_table(rows, ["mode", "step ms", "overhead ms"])
        write_json(args.json, {"ranks": dist.get_world_size(), "step_ms": args.step_ms, "rows": rows})
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--step-ms", type=float, default=20.0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--json", default=os.path.join(RESULTS, "stop_agreement.json"))
    args = p.parse_args(argv)
    if "LOCAL_RANK" in os.environ:
        return worker(args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
           os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])]
    raise SystemExit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
