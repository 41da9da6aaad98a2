"""Training-step throughput: baseline vs text alignment, per precision, channels_last, torch.compile.

    python benchmarks/train_step.py                       # on a GPU: the full grid at the recipes' sizes
    python benchmarks/train_step.py --batch 8 --steps 3   # on a CPU: small batches, fp32/bf16

Data is already on the device (random tensors). For each model (ResNet-50 and DeiT-base at 224 px),
each precision and layout, it times the optimizer step of the plain classifier and of the
text-aligned one (projection head + clip loss, 1024-d embeddings) and reports images/s, step
time, peak memory and the ratio alignment / baseline; and the alignment's own cost measured in
isolation (head + loss + the head's update on pooled features), which is stable where whole steps
are noisy: "isolated ratio" = (baseline + that) / baseline. The gather is a no-op in one process; its
cost on several GPUs is an all-gather of B x 1024 floats per rank (about 1 MB at B=256).
"""
import argparse
import os
import time

import torch

from common import RESULTS, print_table, write_json
from gpt4image import TextAlignedModel, alignment_loss, build_projection_head

MODELS = {"resnet50": dict(batch=256, lr=0.1, tau=0.2, bn=True, std=1024 ** -0.5),
          "deit_base_patch16_224": dict(batch=128, lr=1e-3, tau=0.05, bn=False, std=0.02)}


def seconds_per_call(step, calls, warmup, device):
    """Mean wall time of ``step()`` over ``calls`` calls after ``warmup`` (GPU work included; peak
    memory counted from the timed calls on)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def build(name, aligned, device, channels_last):
    import timm
    import torchvision
    backbone = torchvision.models.resnet50() if name == "resnet50" else timm.create_model(name, drop_path_rate=0.1)
    cfg = MODELS[name]
    head = None
    if aligned:
        in_dim = backbone.fc.in_features if name == "resnet50" else backbone.num_features
        head = build_projection_head("mlp", in_dim, 1024, cfg["bn"], cfg["std"])
    model = TextAlignedModel(backbone, head).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def measure(name, aligned, amp, channels_last, compile_, batch, steps, warmup, device):
    cfg = MODELS[name]
    model = build(name, aligned, device, channels_last)
    if name == "resnet50":
        opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.05, fused=device.type == "cuda")
    step_model = torch.compile(model) if compile_ else model
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    images = torch.randn(batch, 3, 224, 224, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 1000, (batch,), device=device)
    text = torch.nn.functional.normalize(torch.randn(batch, 1024, device=device), dim=-1).half()
    ce = torch.nn.CrossEntropyLoss()

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = step_model(images)
            if aligned:
                logits, z = out
                loss = ce(logits, targets) + 0.3 * alignment_loss(z, text, "clip", cfg["tau"])
            else:
                loss = ce(out, targets)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    elapsed = seconds_per_call(step, steps, warmup, device)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    return {"step_ms": elapsed * 1000, "images_per_s": batch / elapsed, "peak_gib": peak}


def measure_alignment_only(name, amp, batch, steps, warmup, device):
    """The alignment's own cost, isolated from the backbone: projection head forward and backward on
    the pooled features, the clip loss, and the head's optimizer step (stable where full steps are noisy)."""
    cfg = MODELS[name]
    in_dim = 2048 if name == "resnet50" else 768
    head = build_projection_head("mlp", in_dim, 1024, cfg["bn"], cfg["std"]).to(device).train()
    opt = torch.optim.SGD(head.parameters(), lr=cfg["lr"], momentum=0.9)
    features = torch.randn(batch, in_dim, device=device, requires_grad=True)
    text = torch.nn.functional.normalize(torch.randn(batch, 1024, device=device), dim=-1).half()
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = 0.3 * alignment_loss(head(features), text, "clip", cfg["tau"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return seconds_per_call(step, steps * 10, warmup, device) * 1000


def measure_ema(device, repeats=10):
    """DeiT-B's per-step EMA update: per tensor (timm's ModelEmaV2, as DeiT's ModelEma) vs the recipe's
    multi-tensor lerp (ModelEmaV3)."""
    import timm
    from timm.utils import ModelEmaV2, ModelEmaV3
    model = timm.create_model("deit_base_patch16_224").to(device)
    rows = []
    for name, cls in [("per tensor (released)", ModelEmaV2), ("multi-tensor lerp (ours)", ModelEmaV3)]:
        ema = cls(model, decay=0.99996)
        best = float("inf")
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            ema.update(model)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        rows.append({"EMA update, DeiT-B": name, "ms": best * 1000})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--amp", nargs="+", default=None, help="fp32 fp16 bf16 (default: all on GPU, fp32 bf16 on CPU)")
    p.add_argument("--channels-last", nargs="+", type=int, default=[0, 1])
    p.add_argument("--compile", nargs="+", type=int, default=None, help="0 1 (default: both on GPU, 0 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="default: the recipe's per-GPU batch (256 / 128)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default=os.path.join(RESULTS, "train_step.json"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amps = args.amp or (["fp32", "fp16", "bf16"] if device.type == "cuda" else ["fp32", "bf16"])
    compiles = args.compile if args.compile is not None else ([0, 1] if device.type == "cuda" else [0])
    rows = []
    for name in args.models:
        batch = args.batch or MODELS[name]["batch"]
        for amp in amps:
            for cl in args.channels_last:
                if cl and name != "resnet50":
                    continue  # a ViT has no convolutional layout to change beyond the patch embedding
                for comp in compiles:
                    base = measure(name, False, amp, cl, comp, batch, args.steps, args.warmup, device)
                    aligned = measure(name, True, amp, cl, comp, batch, args.steps, args.warmup, device)
                    row = {"model": name, "batch": batch, "amp": amp, "channels_last": bool(cl), "compile": bool(comp),
                           "baseline img/s": base["images_per_s"], "aligned img/s": aligned["images_per_s"],
                           "baseline ms": base["step_ms"], "aligned ms": aligned["step_ms"],
                           "ratio": aligned["step_ms"] / base["step_ms"], "peak GiB": aligned["peak_gib"]}
                    isolated = measure_alignment_only(name, amp, batch, args.steps, args.warmup, device)
                    row["head+loss ms"] = isolated
                    row["isolated ratio"] = (base["step_ms"] + isolated) / base["step_ms"]
                    rows.append(row)
                    print(row, flush=True)
    print()
    print_table(rows, ["model", "batch", "amp", "channels_last", "compile", "baseline img/s", "aligned img/s",
                       "baseline ms", "aligned ms", "ratio", "head+loss ms", "isolated ratio", "peak GiB"])
    ema_rows = []
    if "deit_base_patch16_224" in args.models:
        ema_rows = measure_ema(device)
        print()
        print_table(ema_rows, ["EMA update, DeiT-B", "ms"])
    write_json(args.json, {"rows": rows, "ema": ema_rows, "device": str(device)})


if __name__ == "__main__":
    main()
