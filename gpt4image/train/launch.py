"""A recipe's entry-point plumbing: parse into the recipe's typed config, set up the process group
and logging, wrap the model for several processes, exit with the right code."""
import sys
from collections.abc import Callable

import torch

from ..errors import exit_on_user_error
from ..log import setup_logging
from .distributed import cleanup, init_distributed
from .resumable import PREEMPTED_EXIT_CODE


def wrap_distributed(model: torch.nn.Module, dist_info, sync_bn: bool = False) -> torch.nn.Module:
    """The model to train with: SyncBN (optional) and DDP when several processes run. SyncBN's
    conversion replaces the BatchNorm children in place, keeping their parameters, so ``model`` itself
    stays the one the checkpoints hold."""
    if not dist_info.distributed:
        return model
    if sync_bn:
        converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        assert converted is model, "a model that is itself a BatchNorm layer cannot be converted in place"
    device = dist_info.device
    # gradients live in DDP's all-reduce buckets: no copy in and out of them after every backward
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)


def run_recipe(parser, config_class, run: Callable, argv: list | None = None):
    """A recipe's ``main``: parse into ``config_class`` (the recipe's typed config), set up the process
    group and logging, ``run(config, dist_info)``, and always tear the process group down."""
    config = config_class.from_args(parser.parse_args(argv))
    dist_info = init_distributed(config.local_rank, config.device)
    setup_logging(dist_info.is_main)
    try:
        return run(config, dist_info)
    finally:
        cleanup()


def script_exit(main: Callable, argv: list) -> None:
    """``if __name__ == "__main__"`` of a recipe: exit 2 with one line on bad input, 75 after a stop
    request (run the same command to continue), 0 when done."""
    result = exit_on_user_error(main, argv)
    sys.exit(PREEMPTED_EXIT_CODE if isinstance(result, dict) and result.get("stopped") else 0)
