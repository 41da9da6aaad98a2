"""The experiment's training runs: each run's command line of its recipe, and the runs trained on
several processes (one thread each), their results reported as they finish."""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable

import torch

CONDITIONS = ("baseline", "image", "class-text", "shuffled", "random")


def _recipe_main(recipe):
    """The ``main`` of resnet/main.py or deit/main.py (gpt4image.recipes.resnet / .deit)."""
    import importlib
    return importlib.import_module(f"gpt4image.recipes.{recipe}").main


def run_argv(run: dict, paths: dict[str, str], settings: dict) -> list[str]:
    """The recipe's command line for one run (a dict with recipe, condition, noise, seed, dir)."""
    condition = run["condition"]
    text = {"baseline": ["--text_emb=none"], "class-text": [f"--text_emb={paths['class_table']}"]}.get(
        condition, [f"--text_emb={paths['image_table']}"])
    if condition != "baseline":
        text.append(f"--text-target={condition}")
    common = [f"--epochs={settings['epochs']}", f"--seed={run['seed']}", f"--label-noise={run['noise']}",
              "--checkpoint-every-minutes=0", "-p", "1000", *text]
    if settings.get("lamb") is not None and condition != "baseline":
        common.append(f"--lamb={settings['lamb']}")
    if run["recipe"] == "resnet":
        return [f"--data={paths['data']}", f"--save_dir={run['dir']}", "-a", "resnet18", "-b", "16", "-j", "0",
                "--input-size", str(settings["resnet_size"]), "--lr", "0.05", "--no_scale_lr", *common]
    return [f"--data-path={paths['data']}", f"--output_dir={run['dir']}", "--model", "deit_tiny_patch16_224",
            "--input-size", str(settings["size"]), "--batch-size", "16", "--num_workers", "0", "--lr", "1e-3",
            "--unscale-lr",
            "--warmup-epochs", "1", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--aa", "none",
            "--drop-path", "0", "--model-ema-decay", "0.9", *common]


def _worker(runs, paths, settings, log_path, queue):
    """Train ``runs`` one after another in this process (one thread), reporting each result."""
    torch.set_num_threads(1)
    with open(log_path, "a") as log:  # this process's output goes to its log from here on
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    mains = {}
    try:
        for run in runs:
            started, cpu = time.time(), time.process_time()
            if run["recipe"] not in mains:
                mains[run["recipe"]] = _recipe_main(run["recipe"])
            shutil.rmtree(run["dir"], ignore_errors=True)
            result = mains[run["recipe"]](run_argv(run, paths, settings))
            for name in ("checkpoint.pth", "best_model.pth.tar", "best_checkpoint.pth", "classifier.pth",
                         "classifier_ema.pth"):
                if os.path.exists(os.path.join(run["dir"], name)):
                    os.unlink(os.path.join(run["dir"], name))
            queue.put(dict(run, acc1=result["final_acc1"], seconds=time.time() - started,
                           cpu_seconds=time.process_time() - cpu))
    except BaseException as e:
        import traceback
        traceback.print_exc()
        queue.put({"error": f"{type(e).__name__}: {e}", "log": log_path})
        raise
    finally:
        queue.put(None)


def train_all(runs: list[dict], paths: dict[str, str], settings: dict, jobs: int, out: str,
              on_result: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Run every run on ``jobs`` processes; returns them with ``acc1`` and ``seconds``; ``on_result(done)``
    after each."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    shares = [runs[i::jobs] for i in range(jobs)]
    workers = [ctx.Process(target=_worker, args=(share, paths, settings, os.path.join(out, f"worker{i}.log"), queue))
               for i, share in enumerate(shares) if share]
    for w in workers:
        w.daemon = True  # ended with this process
    for w in workers:
        w.start()
    done, finished, started = [], 0, time.time()
    while finished < len(workers):
        item = queue.get()
        if item is None:
            finished += 1
            continue
        if "error" in item:
            for w in workers:
                w.terminate()
            raise RuntimeError(f"a training run failed ({item['error']}); see {item['log']}")
        done.append(item)
        if on_result:
            on_result(done)
        eta = (time.time() - started) / len(done) * (len(runs) - len(done))
        print(f"[{len(done)}/{len(runs)}] {item['recipe']:6s} {item['condition']:10s} noise {item['noise']:.1f} "
              f"seed {item['seed']}: clean top-1 {item['acc1']:.1f}% ({item['seconds']:.0f} s, "
              f"{item['cpu_seconds']:.0f} s of "
              f"CPU; ~{eta / 60:.0f} min left)",
              flush=True)
    for w in workers:
        w.join()
        if w.exitcode:
            raise RuntimeError(f"a training process failed (exit {w.exitcode}); see {out}/worker*.log")
    return done

