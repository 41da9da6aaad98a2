"""Process-group set-up for every launcher, metric reduction across ranks, and the stall watchdog."""
from __future__ import annotations

import datetime
import os
import re
import subprocess
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..log import logger


@dataclass(kw_only=True)
class DistInfo:
    """This process's place in the run: rank, world size, local rank and device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    control_group: object = None  # a gloo group for small CPU-side agreements (None: the default group)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist):
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        return out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        m = re.match(r"([^\[,]+)(\[(\d+))?", nodelist)  # "node[01-04]" -> "node01"
        return m.group(1) + (m.group(3) or "")


def launch_environment(local_rank_arg: int | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun / launch / SLURM variables, or a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, torch.distributed.launch (--use_env or not)
        local = env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0)
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(local)
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:  # srun python main.py
        nodes = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "localhost"))
        env.setdefault("MASTER_ADDR", _first_slurm_host(nodes))
        env.setdefault("MASTER_PORT", "29500")
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed(local_rank_arg: int | None = None, device: str | None = None,
                     timeout_minutes: float = 30) -> DistInfo:
    """Initialise the process group (NCCL on CUDA, gloo on CPU) if launched with several processes.

    Understands torchrun and ``torch.distributed.launch --use_env`` (RANK/WORLD_SIZE/LOCAL_RANK),
    the legacy launcher's ``--local-rank`` argument (pass it as ``local_rank_arg``), SLURM's srun,
    and plain single-process runs. ``device``: "cuda", "cpu" or None (cuda when available).
    """
    from ..cli import check_device
    check_device(device)
    rank, world_size, local_rank = launch_environment(local_rank_arg)
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=_attempt_store(rank, world_size, timeout),
                                rank=rank, world_size=world_size, timeout=timeout,
                                **({"device_id": dev} if use_cuda else {}))
    control = dist.new_group(backend="gloo") if world_size > 1 and use_cuda else None
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, control_group=control)


def _attempt_store(rank, world_size, timeout):
    """The store ``env://`` would make (MASTER_ADDR/MASTER_PORT; torchrun's agent store when it offers
    one), with its keys under this torchrun attempt's prefix. torchrun restarts a failed group
    against the same agent store, where the previous attempt's keys (the process group's
    addresses) are still set: unprefixed, a restarted rank could read a dead peer's address and wait
    to connect to it (seen here: gloo's connectFullMesh refused or hung after a restart)."""
    env = os.environ
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size,
                          is_master=not agent_store and rank == 0, timeout=timeout,
                          **({} if agent_store else {"multi_tenant": True}))
    return dist.PrefixStore(f"gpt4image/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def is_main_process() -> bool:
    """Rank 0, or a process without a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def reduce_sums(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum a dict of floats over all ranks (used for sample-weighted means: sums and counts)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (e.g. BatchNorm running statistics) to every rank; no-op alone."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        nccl = dist.get_backend() == "nccl"
        for buffer in module.buffers():
            # a CPU copy (e.g. an EMA kept on CPU) is the same everywhere
            if not (nccl and buffer.device.type == "cpu"):
                dist.broadcast(buffer.data, src)


def cleanup() -> None:
    """Destroy the process group, if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class StallWatchdog:
    """Ends a distributed job whose rank stops making progress, instead of letting the others wait in
    a collective for the 30-minute process-group timeout.

    Every step, evaluation batch and checkpoint calls ``heartbeat(phase)``; a thread checks that the
    last one is younger than ``max(timeout_s, 20 x the longest gap between heartbeats since the
    first step)``. Past that it logs the rank, the phase and the wait on every rank it fires on, and
    exits the process (code 1) so that torchrun ends the job.
    """

    def __init__(self, rank: int, timeout_s: float) -> None:
        import threading
        self.rank, self.timeout_s = rank, timeout_s
        self.phase, self.last, self.longest = "start-up", time.monotonic(), 0.0
        self.beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="gpt4image-stall-watchdog", daemon=True)
        self._thread.start()

    def heartbeat(self, phase: str) -> None:
        """Progress in ``phase`` (a step, an evaluation batch, a checkpoint)."""
        now = time.monotonic()
        if self.beats >= 2:  # the first gaps include start-up, compilation and loader workers
            self.longest = max(self.longest, now - self.last)
        self.beats += 1
        self.phase, self.last = phase, now

    def limit(self) -> float:
        """Seconds without a heartbeat after which the watchdog ends the process."""
        return max(self.timeout_s, 20 * self.longest)

    def _watch(self):
        while not self._stop.wait(min(5.0, self.timeout_s / 4)):
            waited = time.monotonic() - self.last
            if waited > self.limit():
                logger.error(f"rank {self.rank}: no progress for {waited:.0f} s after {self.phase} (limit "
                             f"{self.limit():.0f} s, --stall-timeout); another rank is stuck or gone, so this "
                             f"one ends the job instead of waiting for the collective timeout")
                for handler in logger.handlers:
                    handler.flush()
                os._exit(1)

    def close(self) -> None:
        """Stop watching."""
        self._stop.set()


_watchdog = None


def start_watchdog(rank: int, world_size: int, timeout_s: float) -> StallWatchdog | None:
    """Start the StallWatchdog of a distributed run (one process cannot wait for another: none)."""
    global _watchdog
    stop_watchdog()
    if world_size > 1 and timeout_s > 0:
        _watchdog = StallWatchdog(rank, timeout_s)
    return _watchdog


def heartbeat(phase: str) -> None:
    """The running watchdog's heartbeat (nothing without one)."""
    if _watchdog is not None:
        _watchdog.heartbeat(phase)


def stop_watchdog() -> None:
    """Stop the running watchdog, if any."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.close()
        _watchdog = None
