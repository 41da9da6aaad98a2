"""Deterministic, resumable data order and augmentation, and stopping or saving cleanly at a step.

Every training sample's augmentation is seeded from (seed, epoch, position in the rank's epoch
order), and every step's main-process randomness (Mixup, drop-path) from (seed, epoch, step). A run
stopped after step k therefore continues from step k + 1 exactly as if it had never stopped,
whatever the number of loader workers, without reading the skipped images.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from ..log import logger

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request, run the same command again to continue


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style, so neighbouring inputs give unrelated seeds)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def seed_all(seed: int, device: torch.device | str | None = None) -> None:
    """Seed Python's and NumPy's generators, torch's CPU generator and, when ``device`` is a GPU, its.

    Not ``torch.manual_seed``: it also seeds every other backend, and before those are initialised
    (as in every loader worker) that costs about 0.2 ms a call, 7 % of an image's loading time.
    """
    import random
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.default_generator.manual_seed(seed)
    if device is not None and torch.device(device).type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


class ResumableSampler(torch.utils.data.Sampler):
    """Wraps a per-rank sampler; yields ``(epoch, position, index)`` from ``start`` on."""

    def __init__(self, sampler: torch.utils.data.Sampler) -> None:
        self.sampler = sampler
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Serve ``epoch``'s order from position ``start`` on."""
        self.epoch, self.start = epoch, start
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for position, index in enumerate(self.sampler):
            if position >= self.start:
                yield self.epoch, position, index

    def __len__(self) -> int:
        return len(self.sampler) - self.start


class SeededSamples(torch.utils.data.Dataset):
    """Reads ``dataset[index]`` with Python, NumPy and torch seeded from (seed, epoch, position)."""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> object:
        epoch, position, index = key
        seed_all(mix_seed(self.seed, epoch, position))
        if hasattr(self.dataset, "set_epoch"):  # e.g. --text-per-step sample: a draw per epoch
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


WORKER_GRACE_SECONDS = 10


def _exit_after_grace(signum, frame):
    threading.Timer(WORKER_GRACE_SECONDS, os._exit, args=(0,)).start()


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """DataLoader ``worker_init_fn``. A SIGTERM/SIGINT sent to the whole job (a scheduler's
    pre-emption, Ctrl-C) must let the training process finish its step and save; a worker killed at
    once would make that step fail. Workers ignore SIGINT and leave WORKER_GRACE_SECONDS after a
    SIGTERM (long enough to deliver the batch in flight; short enough not to outlive a parent
    that terminated them)."""
    signal.signal(signal.SIGTERM, _exit_after_grace)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


CONTINUE, CHECKPOINT, STOP = 0, 1, 2  # what RunControl tells the training loop after a step
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class RunControl:
    """Agrees, after every step and on all ranks alike, whether to go on, save a checkpoint, or stop.

    SIGTERM, SIGINT and SIGUSR1 (SLURM's warning before the time limit, ``#SBATCH --signal=USR1@120``)
    become a request to stop at a step boundary; a second SIGINT interrupts at once. Every
    ``checkpoint_every_s`` seconds (by rank 0's clock; 0: never) it asks for a checkpoint inside
    the epoch. ``group`` is a CPU (gloo) process group for the agreement, so no GPU synchronisation
    is added to the step; each call starts an asynchronous all-reduce of this rank's flags and reads
    the one started by the previous call, so the exchange runs in the background during a step
    instead of blocking every rank at every step boundary (``benchmarks/stop_agreement.py``: about a
    third of the blocking cost). Every rank calls once per step, so all read the same answer at the
    same step: the action comes one step after the signal or the deadline.
    """

    def __init__(self, group: object = None, checkpoint_every_s: float = 0.0, is_main: bool = True) -> None:
        self.received = None
        self.group = group
        self.checkpoint_every_s = checkpoint_every_s if is_main else 0.0
        self._last_save = time.monotonic()
        self._pending = None  # (work, tensor) of the exchange started by the previous call
        self._previous = {}
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        logger.warning(f"received {signal.Signals(signum).name}: stopping at the next step boundary")

    def _collect(self):
        if self._pending is None:
            return 0
        work, flag = self._pending
        self._pending = None
        work.wait()
        return int(flag.item())

    def _local_flags(self):
        """(signal number << 1) | checkpoint due: a MAX over ranks keeps any stop, else any due."""
        due = self.checkpoint_every_s > 0 and time.monotonic() - self._last_save >= self.checkpoint_every_s
        if due:
            self._last_save = time.monotonic()
        return (int(self.received or 0) << 1) | int(due)

    def __call__(self) -> int:
        local = self._local_flags()
        if dist.is_available() and dist.is_initialized():
            agreed = self._collect()
            flag = torch.tensor([local], dtype=torch.int32)
            self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        else:
            agreed = local
        if agreed >> 1:
            self._collect()  # every rank started this exchange too: finish it before stopping
            if self.received is None:
                self.received = agreed >> 1
            return STOP
        return CHECKPOINT if agreed & 1 else CONTINUE

    def saved(self) -> None:
        """A checkpoint was written: the next periodic one is due ``checkpoint_every_s`` from now."""
        self._last_save = time.monotonic()

    @property
    def name(self) -> str | None:
        """The name of the stop signal received (SIGTERM, ...), or None."""
        return signal.Signals(self.received).name if self.received else None

    def restore(self) -> None:
        """Finish the exchange in flight and give the signals their previous handlers back."""
        self._collect()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
